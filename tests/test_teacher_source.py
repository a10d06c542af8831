"""``model.pretrained`` is checked before anything loads: a pipeline folder, a hub id in the local hub cache (laid out
as huggingface_hub lays it out), or a hub id the hub answers for; otherwise the reason is named.

The hub is played by a local HTTP server answering as the hub does (status codes and ``X-Error-Code`` headers), and
reached through ``HF_ENDPOINT``, so the real request path runs."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from senseflow_algos.checks.teacher_source import check_teacher_source, teacher_source_problem
from senseflow_algos.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _problem_in_fresh_python(pretrained: str, env: dict) -> str | None:
    """``teacher_source_problem`` where huggingface_hub reads ``env`` at import (its constants are fixed then)."""
    code = ('import json\nfrom senseflow_algos.checks.teacher_source import teacher_source_problem\n'
            f'print(json.dumps(teacher_source_problem({pretrained!r}, timeout=2.0)))\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pipeline_folder_passes_and_other_folders_are_named(tmp_path):
    assert teacher_source_problem(str(REPO / 'senseflow_algos' / 'shapes' / 'assets' / 'teacher')) is None
    (tmp_path / 'transformer').mkdir()
    assert 'folder without a model_index.json' in teacher_source_problem(str(tmp_path))
    (tmp_path / 'weights.safetensors').write_bytes(b'')
    assert 'is a file' in teacher_source_problem(str(tmp_path / 'weights.safetensors'))
    assert 'no such path' in teacher_source_problem(str(tmp_path / 'missing'))
    assert 'no such path' in teacher_source_problem('/models/FLUX.1-dev')


def test_check_names_the_key_and_tiny_needs_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"model.pretrained='/nope/flux' is neither"):
        check_teacher_source({'model': {'pretrained': '/nope/flux'}}, 'x.yaml')
    with pytest.raises(ConfigError, match='model.pretrained is not set'):
        check_teacher_source({'model': {}}, 'x.yaml')
    check_teacher_source({'model': {'tiny': True}}, 'x.yaml')


def test_hub_id_in_the_local_cache_passes_without_the_network(tmp_path):
    # huggingface_hub's cache layout: models--<owner>--<name>/{refs/main, snapshots/<commit>/<file>}.
    repo = tmp_path / 'hub' / 'models--acme--tiny-flux'
    commit = '0123456789abcdef0123456789abcdef01234567'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    (repo / 'snapshots' / commit).mkdir(parents=True)
    (repo / 'snapshots' / commit / 'model_index.json').write_text('{}')
    env = {'HF_HUB_CACHE': str(tmp_path / 'hub'), 'HF_ENDPOINT': 'http://127.0.0.1:9'}  # nothing listens on port 9
    assert _problem_in_fresh_python('acme/tiny-flux', env) is None
    assert 'did not answer' in _problem_in_fresh_python('acme/other', env)
    offline = _problem_in_fresh_python('acme/other', {**env, 'HF_HUB_OFFLINE': '1'})
    assert 'HF_HUB_OFFLINE=1' in offline and str(tmp_path / 'hub') in offline


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers HEAD /<owner>/<name>/resolve/<rev>/model_index.json as the hub does for a few repositories."""
    answers = {'acme/flux': (200, None), 'acme/gated': (401, 'GatedRepo'), 'acme/secret': (401, 'RepoNotFound'),
               'acme/unet': (404, 'EntryNotFound')}

    def do_HEAD(self):  # noqa: N802 (http.server's name)
        repo = '/'.join(self.path.strip('/').split('/')[:2])
        code, error = self.answers.get(repo, (401, 'RepoNotFound'))
        self.send_response(code)
        if error:
            self.send_header('X-Error-Code', error)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_hub_answers_are_named(hub, tmp_path):
    env = {'HF_ENDPOINT': hub, 'HF_HUB_CACHE': str(tmp_path / 'empty-cache')}
    assert _problem_in_fresh_python('acme/flux', env) is None
    assert 'gated hub repository' in _problem_in_fresh_python('acme/gated', env)
    assert 'not a hub repository this machine can see' in _problem_in_fresh_python('acme/secret', env)
    assert 'without a model_index.json' in _problem_in_fresh_python('acme/unet', env)
