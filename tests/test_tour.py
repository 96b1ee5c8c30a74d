"""The tour: every notebook in tour/ runs top to bottom in a fresh kernel without an error,
and is committed with its outputs (so it reads on a code-hosting site without being run)."""
import json
import time
from pathlib import Path

import pytest

from conftest import _missing

TOUR = Path(__file__).resolve().parents[1] / 'tour'
CHAPTERS = sorted(TOUR.glob('[0-9][0-9]_*.ipynb'))


def test_the_tour_has_its_chapters_in_order():
    numbers = [int(path.name[:2]) for path in CHAPTERS]
    assert numbers == list(range(1, len(CHAPTERS) + 1)), [path.name for path in CHAPTERS]
    assert len(CHAPTERS) >= 8


@pytest.mark.parametrize('path', CHAPTERS, ids=lambda path: path.stem)
def test_each_chapter_is_committed_with_its_outputs(path):
    notebook = json.loads(path.read_text())
    code = [cell for cell in notebook['cells'] if cell['cell_type'] == 'code']
    unrun = [i for i, cell in enumerate(code) if cell.get('execution_count') is None]
    assert not unrun, f"{path.name}: code cells {unrun} were committed without being run"
    outputs = [output for cell in code for output in cell.get('outputs', [])]
    assert not [o for o in outputs if o.get('output_type') == 'error'], f"{path.name} was committed with an error"
    assert any('image/png' in o.get('data', {}) for o in outputs), f"{path.name} has no figure"
    assert any(cell['cell_type'] == 'markdown' and 'xercise' in ''.join(cell['source'])
               for cell in notebook['cells']), f"{path.name} has no exercise"


@pytest.mark.slow
@pytest.mark.parametrize('path', CHAPTERS, ids=lambda path: path.stem)
def test_each_chapter_runs_top_to_bottom_in_a_fresh_kernel(path, notop_weights, catdog):
    try:
        import nbclient
        import nbformat
        import matplotlib  # noqa: F401  (the tour draws with it)
    except ImportError as error:
        _missing(f"the tour needs Jupyter and matplotlib (pip install -e '.[tour]'): {error}")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                     resources={'metadata': {'path': str(TOUR)}})
    started = time.perf_counter()
    client.execute()                     # raises CellExecutionError, naming the cell, on any error
    print(f"{path.name}: {time.perf_counter() - started:.1f} s")
