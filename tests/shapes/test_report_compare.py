"""``compare_reports``: a 2-step student's shapes report beside the 4-step one, from the two runs' report.json."""

import json

import pytest

from senseflow_algos.shapes.report import compare_reports, format_report_table


def _row(steps, fd_t):
    acc = {g: {'prompt': 0.5, 'colour': 0.9, 'shape': 0.9, 'position': 0.8, 'relation': 0.2}
           for g in ('single', 'two', 'all')}
    return {'acc': acc, 'fd_t': fd_t, 'fd_r': 1.0, 'steps': steps, 'sec_per_image': 0.01}


def _write(path, k, fd_student, n=512):
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({'n': n, 'guidance': 4.0, 'renderer': {'acc': _row(0, 0)['acc']}, 'rows': {
        'teacher 50-step Euler': _row(50, 0.06), f'teacher {k}-step Euler': _row(k, 0.2 / k),
        f'student {k}-step': _row(k, fd_student)}}))
    return path


def test_two_runs_give_one_table(tmp_path):
    four = _write(tmp_path / 'shapes' / 'shapes_report' / 'report.json', 4, 0.11)
    two = _write(tmp_path / 'shapes_2step' / 'shapes_report' / 'report.json', 2, 0.3)
    merged = compare_reports([four, two])
    assert list(merged['rows']) == ['teacher 50-step Euler', 'teacher 4-step Euler', 'student 4-step',
                                    'teacher 2-step Euler', 'student 2-step']
    assert merged['rows']['student 2-step']['fd_t'] == 0.3
    table = format_report_table(merged)
    assert '| student 2-step | 2 | 0.30 |' in table and 'renderer (ground truth)' in table
    # Two students of the same step count: the second is named by its run folder.
    again = _write(tmp_path / 'shapes_2step_b' / 'shapes_report' / 'report.json', 2, 0.25)
    assert 'student 2-step (shapes_2step_b)' in compare_reports([four, two, again])['rows']


def test_reports_of_other_prompt_suites_are_refused(tmp_path):
    four = _write(tmp_path / 'a' / 'r' / 'report.json', 4, 0.11)
    small = _write(tmp_path / 'b' / 'r' / 'report.json', 2, 0.3, n=64)
    with pytest.raises(ValueError, match='n=64 differs'):
        compare_reports([four, small])
