"""The shapes report's headline: which of issue 16's distillation goals a student meets, on hand-made rows."""

from senseflow_algos.shapes.report import format_headline, headline


def _row(steps, single, two, relation, geo_single, geo_two, fd_r):
    return {'steps': steps, 'fd_r': fd_r, 'acc': {'single': {'prompt': single}, 'two': {'prompt': two,
                                                                                       'relation': relation}},
            'geometry': {'single': geo_single, 'two': geo_two}}


def test_headline_goals():
    report = {'rows': {
        'teacher 50-step Euler': _row(50, 0.97, 0.70, 0.80, 0.95, 0.80, 0.30),
        'teacher 4-step Euler': _row(4, 0.90, 0.50, 0.60, 0.85, 0.70, 0.60),
        # beats the 4-step Euler on everything but two-shape geometry (0.70 = 0.70 is not better) and is 6 points
        # under the full-step teacher on two-shape prompts (0.64 < 0.70 - 0.05).
        'student 4-step': _row(4, 0.93, 0.64, 0.65, 0.90, 0.70, 0.40),
    }}
    goals = {g['goal']: g['met'] for g in headline(report)}
    assert goals == {
        'acc single > teacher 4-step': True,
        'shape by geometry single > teacher 4-step': True,
        'acc two > teacher 4-step': True,
        'shape by geometry two > teacher 4-step': False,
        'relation > teacher 4-step': True,
        'FD-R < teacher 4-step': True,
        'acc single within 5 points of teacher 50-step': True,
        'acc two within 5 points of teacher 50-step': False,
    }
    text = format_headline(headline(report))
    assert text.startswith('Distillation goals met: 6 of 8')
    assert '- [ ] acc two within 5 points of teacher 50-step: student 0.640, teacher 0.700' in text


def test_teacher_only_report_has_no_headline():
    report = {'rows': {'teacher 50-step Euler': _row(50, 0.97, 0.70, 0.80, 0.95, 0.80, 0.30)}}
    assert headline(report) == [] and format_headline([]) == ''
