"""The teacher must be reachable: ``model.pretrained`` is a diffusers pipeline folder, a cached hub id, or a hub id
the hub answers for.

Checked with one short request (no retries, a few seconds at most), so an unreachable hub, a gated repository or a
typo stops the run at once with the reason, instead of after the hub library's retries and a generic
"couldn't connect" message.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from senseflow_algos.config import ConfigError

__all__ = ['HUB_ID', 'check_teacher_source', 'teacher_source_problem']

#: ``owner/name`` as the hub spells repository ids.
HUB_ID = re.compile(r'^[A-Za-z0-9][\w.\-]*/[\w.\-]+$')
#: Seconds the hub gets to answer the one request.
HUB_TIMEOUT = 3.0
INDEX = 'model_index.json'


def _download_hint(repo: str) -> str:
    return (f'download it where the hub is reachable (huggingface-cli download {repo} --local-dir <folder>) and set '
            'model.pretrained=<folder>, or point HF_HOME at a cache that holds it')


def _hub_problem(repo: str, revision: Optional[str], timeout: float) -> Optional[str]:
    """Why hub repository ``repo`` cannot serve a pipeline, else ``None`` (cached, or the hub has its index)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, INDEX, revision=revision), str):
        return None
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        return (f'is a hub id that is not in the local cache ({cache}) and the hub is switched off '
                f'(HF_HUB_OFFLINE=1): {_download_hint(repo)}')
    import requests
    from huggingface_hub.utils import build_hf_headers

    url = f'{constants.ENDPOINT}/{repo}/resolve/{revision or "main"}/{INDEX}'
    try:
        response = requests.head(url, headers=build_hf_headers(), timeout=timeout, allow_redirects=False)
    except requests.RequestException as e:
        reason = type(e).__name__ + (': name resolution failed' if 'resolve' in str(e).lower() else '')
        return (f'is a hub id that cannot be fetched: the hub ({constants.ENDPOINT}) did not answer within '
                f'{timeout:g} s ({reason}) and the pipeline is not in the local cache ({cache}): {_download_hint(repo)}')
    code, error = response.status_code, response.headers.get('X-Error-Code', '')
    if code < 400:
        return None
    if error == 'GatedRepo' or code == 403:
        return (f'is a gated hub repository this machine has no access to (HTTP {code}): accept its licence on the '
                'hub, then log in (huggingface-cli login, or set HF_TOKEN)')
    if error == 'RepoNotFound' or code == 401:
        return (f'is not a hub repository this machine can see (HTTP {code}): check the spelling, or log in '
                '(huggingface-cli login / HF_TOKEN) if it is private')
    if error == 'RevisionNotFound':
        return f'has no revision {revision!r} on the hub (model.revision)'
    if error == 'EntryNotFound' or code == 404:
        return f'is a hub repository without a {INDEX}: not a diffusers pipeline (revision {revision or "main"})'
    return f'could not be checked on the hub: HTTP {code} from {url}'


def teacher_source_problem(pretrained: str, revision: Optional[str] = None,
                           timeout: float = HUB_TIMEOUT) -> Optional[str]:
    """Why ``pretrained`` cannot be loaded as a diffusers pipeline, or ``None`` when it can.

    Args:
        pretrained: A local pipeline folder or a hub id ``owner/name``.
        revision: Hub revision (branch, tag or commit).
        timeout: Seconds to wait for the hub.

    Returns:
        A phrase that completes ``model.pretrained=<value> ...``, or ``None``.
    """
    path = Path(os.path.expanduser(pretrained))
    if path.is_dir():
        if (path / INDEX).is_file():
            return None
        return (f'is a folder without a {INDEX}: not a diffusers pipeline folder (write one with '
                "DiffusionPipeline.save_pretrained, or huggingface-cli download <id> --local-dir <folder>)")
    if path.exists():
        return 'is a file; a diffusers pipeline folder (with model_index.json) or a hub id is expected'
    if pretrained.startswith(('.', '/', '~')) or not HUB_ID.match(pretrained):
        return 'is neither an existing folder (no such path) nor a hub id of the form owner/name'
    return _hub_problem(pretrained, revision, timeout)


def check_teacher_source(cfg: dict[str, Any], source: str) -> None:
    """``model.pretrained`` must name a loadable pipeline (``model.tiny: true`` needs none).

    Raises:
        ConfigError: Naming ``model.pretrained`` and why it cannot be loaded.
    """
    model = cfg['model']
    if model.get('tiny'):
        return
    pretrained = model.get('pretrained')
    if not pretrained:
        raise ConfigError(f'{source}: model.pretrained is not set: give the teacher as a hub id (e.g. '
                          'black-forest-labs/FLUX.1-dev) or a local diffusers pipeline folder, or set model.tiny=true '
                          'for the random-weight tiny model')
    problem = teacher_source_problem(str(pretrained), revision=model.get('revision'))
    if problem:
        raise ConfigError(f'{source}: model.pretrained={pretrained!r} {problem}')
