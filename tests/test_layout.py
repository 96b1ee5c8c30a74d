"""The package's wings and the direction of their imports.

- the textbook (the modules at the top of minixcept/ and layers/) imports NumPy, the standard
  library and itself - nothing from engines/, files/ or workflows/. Its only doors to the other
  wings are the few methods named in DOORS, which import what they need when called;
- engines/ and files/ build on the textbook, never on each other or on workflows/;
- workflows/ may use all three; so may the command-line entry points at the top
  (``python -m minixcept.compare``), which only call into workflows/;
- course/ (the tour's grader) may use every wing, and no wing imports it.
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / 'minixcept'
WINGS = ('engines', 'files', 'workflows', 'course')
#: which wings each wing may import ('textbook' is everything outside the three folders)
ALLOWED = {
    'textbook': {'textbook'},
    'engines': {'textbook', 'engines'},
    'files': {'textbook', 'files'},
    'workflows': {'textbook', 'engines', 'files', 'workflows'},
    'course': {'textbook', 'engines', 'files', 'workflows', 'course'},   # the grader: read by nothing
}
#: (module, function) pairs where the textbook may import another wing, at call time only
#: command-line entry points at the top of the package, counted with the workflows they start
ENTRY_POINTS = {'minixcept.compare'}
DOORS = {('minixcept.model', 'predict'), ('minixcept.model', 'load_weights'),
         ('minixcept.model', 'save_weights'), ('minixcept.model', 'imagenet_weights')}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def wing_of(module):
    if module in ENTRY_POINTS:
        return 'workflows'
    parts = module.split('.')
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else 'textbook'


def imports(path):
    """(imported module, enclosing function or None, line) for every import in ``path``."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((alias.name, function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ''
                if child.level:
                    anchor = package.split('.')[:len(package.split('.')) - child.level + 1]
                    base = '.'.join(anchor + ([base] if base else []))
                targets = [base] if child.module else [f'{base}.{alias.name}' for alias in child.names]
                found.extend((target, function, child.lineno) for target in targets)
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), None)
    return found


SOURCES = sorted(p for p in PACKAGE.rglob('*.py') if '__pycache__' not in p.parts)


@pytest.mark.parametrize('path', SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_go_only_where_the_wing_may_look(path):
    module = module_name(path)
    wing = wing_of(module)
    for target, function, line in imports(path):
        if not target.startswith('minixcept.') or module == 'minixcept':
            continue                     # the package's front door offers every wing, lazily
        if wing_of(target) in ALLOWED[wing]:
            continue
        assert (module, function) in DOORS, (
            f"{path.name}:{line}: {wing} module {module} imports {target} ({wing_of(target)}); "
            f"the {wing} may import only {sorted(ALLOWED[wing])}")
        assert function is not None


def test_the_textbook_imports_only_numpy_and_the_standard_library_at_load():
    stdlib = set(getattr(sys, 'stdlib_module_names', ())) or pytest.skip('needs Python 3.10+')
    for path in SOURCES:
        module = module_name(path)
        if wing_of(module) != 'textbook':
            continue
        for target, function, line in imports(path):
            top = target.split('.')[0]
            if function is None and top not in stdlib | {'numpy', 'minixcept'}:
                pytest.fail(f"{path.name}:{line} imports {target} when it loads")


def test_layers_and_xception_run_with_numpy_alone():
    """h5py, Pillow, threadpoolctl, TensorFlow and CuPy hidden: the textbook still imports,
    builds Xception and runs it forward and backward, and loads no other wing."""
    script = textwrap.dedent('''
        import sys
        class Hide:
            HIDDEN = ('h5py', 'PIL', 'threadpoolctl', 'tensorflow', 'keras', 'cupy')
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in self.HIDDEN:
                    raise ImportError(f'{name} is hidden in this test')
        sys.meta_path.insert(0, Hide())
        import numpy as np
        import minixcept.layers
        import minixcept
        model = minixcept.Xception(include_top=False, input_shape=(71, 71, 3), pooling='avg')
        x = minixcept.preprocess_input(np.random.default_rng(0).integers(0, 256, (1, 71, 71, 3)))
        y = model.forward(x, training=True)
        dx = model.backward(np.ones_like(y))
        assert y.shape == (1, 2048) and dx.shape == x.shape
        loaded = sorted(m for m in sys.modules if m.startswith(('minixcept.engines', 'minixcept.files',
                                                               'minixcept.workflows')))
        assert not loaded, loaded
        print('ok')
    ''')
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == 'ok', run.stderr


def test_the_import_check_sees_a_textbook_module_reaching_for_an_engine(tmp_path, monkeypatch):
    """The check above is not blind: a layer file importing the engine room fails it."""
    probe = tmp_path / 'probe.py'
    probe.write_text('from ..engines import inference\n')
    monkeypatch.setattr(sys.modules[__name__], 'module_name', lambda path: 'minixcept.layers.probe')
    with pytest.raises(AssertionError, match='imports minixcept.engines'):
        test_imports_go_only_where_the_wing_may_look(probe)
