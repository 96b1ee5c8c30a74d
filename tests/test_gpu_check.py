"""benchmarks/gpu_check.py in its dry mode: the GPU machine's one command keeps working.

The run on a GPU happens only when one is lent; this runs the same code at tiny sizes in
every test run: once through the shell script on NumPy, and once in-process on the CuPy
path with the stand-in in CuPy's place, so the script's own host/device discipline is
checked too.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import CATDOG, REPO, array_backend

SCRIPT = REPO / 'benchmarks' / 'gpu_check.py'


def load_gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_report(report, expect_suite=True):
    machine, features = report['machine'], report['features']
    assert machine['dry'] is True
    if expect_suite:
        tests = report['tests']
        assert tests['exit_code'] == 0 and tests['failed'] == tests['errors'] == 0 and tests['passed'] > 0, tests
    assert features['ok'] and features['shape'] == [2, 2048], features
    assert max(features['max_relative_error'].values()) <= 1e-4
    throughput = report['throughput']
    for batch in (1, 2, 3):
        timing = throughput[f'forward_batch_{batch}']['minixcept_layers']
        assert timing['ms'] > 0 and np.isclose(timing['photos_per_s'], batch * 1e3 / timing['ms'])
    assert throughput['training_step_batch_2']['minixcept']['ms'] > 0
    floor = report['floor']
    assert floor['hardware']['copy_bytes_per_s'] > 0 and floor['hardware']['matmul_multiply_adds_per_s'] > 0
    forward = floor['per_batch']['forward_batch_3']
    assert forward['floor_ms'] == max(forward['compute_ms'], forward['memory_ms']) > 0
    assert floor['per_batch']['training_step_batch_2']['compute_ms'] > floor['per_batch']['forward_batch_2']['compute_ms']
    if 'skipped' in report['torch']:
        assert 'PyTorch' in report['torch']['skipped']                # says why
    else:
        assert report['torch']['ok'], report['torch']                 # same features as minixcept
        assert 'torch' in throughput['forward_batch_2']


def photo_folder(tmp_path):
    """The cat/dog photos when they are beside the repository, else two small ones made here."""
    if CATDOG.is_dir():
        return CATDOG / 'validation'
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (90, 80, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
    return tmp_path


def test_dry_run_of_the_shell_command_on_numpy(tmp_path):
    out = tmp_path / 'dry.json'
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu_check.sh'), str(out), '--dry', '--skip-tests',
                             '--photos', str(photo_folder(tmp_path))],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['machine']['backend'] == 'numpy' and report['tests'] == {'skipped': '--skip-tests'}
    check_report(report, expect_suite=False)


def test_dry_run_on_the_cupy_path_with_the_stand_in(tmp_path):
    gpu_check = load_gpu_check()
    with array_backend('standin'):
        report = gpu_check.main(['--dry', '--device-backend', 'cupy', '--out', str(tmp_path / 'dry.json'),
                                 '--photos', str(photo_folder(tmp_path))])
    assert report['machine']['backend'] == 'cupy' and 'stand-in' in report['machine']['gpu']
    assert '--backends=standin' in report['tests']['command']
    check_report(report)
    assert json.loads((tmp_path / 'dry.json').read_text()) == json.loads(json.dumps(report))
