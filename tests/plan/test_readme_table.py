"""The README's "what fits where" table is the planner's, as bench/plan_table.py last wrote it (not edited by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _plan_table_module():
    spec = importlib.util.spec_from_file_location('plan_table', REPO / 'bench' / 'plan_table.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_the_generated_one(tmp_path):
    bench = _plan_table_module()
    readme = (REPO / 'README.md').read_text()
    block = readme.split(bench.README_BEGIN, 1)[1].split(bench.README_END, 1)[0].strip('\n')
    generated = (REPO / 'bench' / 'results' / 'plan.md').read_text()
    table = generated[generated.index('| model |'):].strip('\n').split('\n\n')[0]
    assert block == table
    # The writer replaces exactly the block between the markers.
    copy = tmp_path / 'README.md'
    copy.write_text(readme)
    bench.write_readme_table(['| a |', '|---|', '| 1 |'], copy)
    rewritten = copy.read_text()
    assert rewritten.split(bench.README_BEGIN)[0] == readme.split(bench.README_BEGIN)[0]
    assert rewritten.split(bench.README_END)[1] == readme.split(bench.README_END)[1]
    assert '| 1 |' in rewritten and '| FLUX.1-dev | 8 |' not in rewritten
