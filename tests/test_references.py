"""No file of the project sends its reader to a document the repository does not hold.

A reader has the repository and nothing else, so every document a file names must be in it.
Checked over every text file of the project (sources, tests, examples, benchmarks, the
README files, the CI script):

- every Markdown file named (a word ending in ``.md``, with or without a path) must be a
  file of the repository: the path taken from the naming file's folder or from the root, or,
  for a bare name, some file of that name anywhere in the tree. A path that leaves the
  repository (up through ``..``) always fails. Names of files the project writes
  rather than cites are listed in WRITTEN, each with the place that writes it;
- no file cites numbered passages of a design kept elsewhere, or that design itself
  (CITATION's phrases): they are reported wherever they appear.

The examples the last test feeds the patterns are assembled from pieces, so that this file
passes its own scan.
"""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ('minixcept', 'examples', 'tests', 'benchmarks', 'weights', '.ci')
TEXT_SUFFIXES = {'.py', '.md', '.toml', '.json', '.txt', '.cfg', '.ini', '.yml', '.yaml', ''}
SKIPPED_PARTS = {'__pycache__', '.pytest_cache', 'runs', '.venv'}

MARKDOWN_NAME = re.compile(r'(?<![\w.-])((?:\.\./|\./|[\w.-]+/)*[\w-]+\.md)\b')
CITATION = re.compile(r'\bpitfall \d+ of\b|\bof the design\b|\bthe design (?:doc|document|notes)\b', re.IGNORECASE)
# Markdown files the project writes (named as output, not cited), and who writes them.
WRITTEN = {'report.md': 'benchmarks/forward.py --out report.md'}


def project_files():
    files = [REPO / 'README.md', REPO / 'pyproject.toml']
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob('*')):
            if (path.is_file() and path.suffix in TEXT_SUFFIXES
                    and not SKIPPED_PARTS & set(path.relative_to(REPO).parts)):
                files.append(path)
    return files


def names_a_document_of_the_repository(name, naming_file, markdown_files):
    for base in (naming_file.parent, REPO):
        target = (base / name).resolve()
        if target.is_relative_to(REPO) and target.is_file():
            return True
    return '/' not in name and name in {path.name for path in markdown_files}


def test_the_scan_covers_the_project():
    files = project_files()
    assert REPO / 'README.md' in files and Path(__file__) in files
    assert len(files) > 50 and any(path.parent.name == 'reference' for path in files)


def test_named_markdown_documents_are_in_the_repository():
    files = project_files()
    markdown_files = [path for path in files if path.suffix == '.md']
    missing = []
    for path in files:
        for number, line in enumerate(path.read_text(errors='replace').splitlines(), 1):
            for name in MARKDOWN_NAME.findall(line):
                if name in WRITTEN or name.rsplit('/', 1)[-1] in WRITTEN:
                    continue
                if not names_a_document_of_the_repository(name, path, markdown_files):
                    missing.append(f'{path.relative_to(REPO)}:{number}: {name}')
    assert not missing, 'documents named but not in the repository:\n' + '\n'.join(missing)


def test_no_file_cites_passages_of_an_absent_document():
    found = [f'{path.relative_to(REPO)}:{number}: {line.strip()}'
             for path in project_files()
             for number, line in enumerate(path.read_text(errors='replace').splitlines(), 1)
             if CITATION.search(line)]
    assert not found, 'citations of a document the repository does not have:\n' + '\n'.join(found)


def test_the_checks_catch_what_they_are_for():
    """The patterns find the usual forms of such a citation, and pass the repository's own documents."""
    md = '.' + 'md'
    outside, absent = f'../shared/NOTES{md}', f'ARCHITECTURE{md}'
    lines = [f'see {outside}, section 2', f'as {absent} says', 'Pitfall {} of the {}:'.format(1, 'design')]
    found = [name for line in lines for name in MARKDOWN_NAME.findall(line)]
    assert found == [outside, absent]
    markdown_files = [REPO / 'benchmarks' / f'RESULTS{md}']
    assert not names_a_document_of_the_repository(outside, REPO / 'tests' / 'x.py', markdown_files)
    assert not names_a_document_of_the_repository(absent, REPO / 'tests' / 'x.py', markdown_files)
    assert names_a_document_of_the_repository(f'RESULTS{md}', REPO / 'README.md', markdown_files)
    assert names_a_document_of_the_repository(f'benchmarks/RESULTS{md}', REPO / 'README.md', markdown_files)
    assert CITATION.search(lines[2]) and not CITATION.search('the design of the engine')
