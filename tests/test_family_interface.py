"""The family interface: a teacher family is one module, registered by itself, named nowhere else in the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from senseflow_algos.models.families import FAMILIES, FluxFamily, SD35Family, get_family

ROOT = Path(__file__).resolve().parents[1]
FAMILY_DIR = ROOT / 'senseflow_algos' / 'models' / 'families'
#: Code a family could leak into: the package and the command-line scripts.
CODE = [*sorted((ROOT / 'senseflow_algos').rglob('*.py')), *(ROOT / n for n in ('train.py', 'export.py', 'eval.py')),
        *sorted((ROOT / 'data_prep').glob('*.py'))]
#: The files that name the two families the package started with, besides their own module, and why.
FIRST_FAMILIES_ELSEWHERE = {
    'flux': {
        'senseflow_algos/__init__.py',  # lazy re-export of FluxFamily
        'senseflow_algos/models/__init__.py',  # re-export
        'senseflow_algos/models/families/__init__.py',  # re-export
        'senseflow_algos/models/tiny.py',  # its tiny builder predates the interface (tiny_pipeline calls it)
        'senseflow_algos/shapes/components.py',  # the shapes world is a FLUX world by design
        'senseflow_algos/shapes/report.py',
        'senseflow_algos/shapes/train_teacher.py',
        'senseflow_algos/shapes/stage_check.py',  # samples a shapes teacher stage (a FLUX network)
    },
    'sd35': {
        'senseflow_algos/__init__.py', 'senseflow_algos/models/__init__.py',
        'senseflow_algos/models/families/__init__.py', 'senseflow_algos/models/tiny.py',
    },
}


def _family_classes_in_files() -> dict[str, tuple[str, str]]:
    """``name -> (module file, class)`` of every class in the families package that sets ``name = '...'``, read
    from the source (not from the registry under test)."""
    found = {}
    for path in sorted(FAMILY_DIR.glob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and [getattr(t, 'id', None) for t in stmt.targets] == ['name']
                            and isinstance(stmt.value, ast.Constant) and stmt.value.value):
                        found[stmt.value.value] = (path.name, node.name)
    return found


def test_every_family_module_is_registered_under_its_name():
    in_files = _family_classes_in_files()
    assert set(FAMILIES) == set(in_files)
    for name, (module, cls) in in_files.items():
        assert FAMILIES[name].__name__ == cls and FAMILIES[name].__module__.endswith('.' + module[:-3])


def _mentions(name: str, cls: type) -> set[str]:
    """Code files that name the family: its YAML name as a string literal, its class or its module."""
    module = cls.__module__.rsplit('.', 1)[1]
    pattern = re.compile(rf"""(['"]){re.escape(name)}\1|\b{cls.__name__}\b|families\.{module}\b|families import .*\b"""
                         rf'{module}\b')
    return {str(p.relative_to(ROOT)) for p in CODE if pattern.search(p.read_text())}


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_a_family_touches_its_own_file_its_yamls_and_the_schema_only(name):
    cls = FAMILIES[name]
    own = f'senseflow_algos/models/families/{cls.__module__.rsplit(".", 1)[1]}.py'
    allowed = {own} | FIRST_FAMILIES_ELSEWHERE.get(name, set())
    assert _mentions(name, cls) - allowed == set(), f'{name} is named outside its module'
    # The YAML side: the schema's enum names it, and its YAMLs select it.
    schema = (ROOT / 'yamls' / 'schema.yaml').read_text()
    assert re.search(rf"family: enum\([^)]*'{name}'", schema)
    assert any(re.search(rf'^\s*family: {name}\s*$', p.read_text(), re.M) for p in (ROOT / 'yamls').rglob('*.yaml'))


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_interface_members_are_set(name):
    family = get_family(name)
    assert family.network_class and family.pipeline_class and family.text_components
    import diffusers

    for attr in ('network_class', 'vae_class', 'scheduler_class', 'pipeline_class'):
        assert hasattr(diffusers, getattr(family, attr)), f'{name}.{attr}={getattr(family, attr)!r}'
    lo, hi = family.defaults.dmd_guidance
    assert 0 <= lo <= hi and family.defaults.isg_margin > 0


# -- anchors from YAML (model.family_kwargs.anchors) ---------------------------------------------------------------

def test_flux_anchor_indices_are_sigma_times_1000():
    # FLUX's grid: sigma = t / 1000 (method notes 1.7: the reference's hard-coded [1000, 904, 759, 512]).
    got = FluxFamily(anchors=[1000, 904, 759, 512]).anchors((128, 128), 4)
    assert torch.equal(got, torch.tensor([1.0, 0.904, 0.759, 0.512], dtype=torch.float64))


def test_sd35_anchor_indices_go_through_shift3():
    # SD 3.5: sigma = shift3((i + 1) / 1000), shift3(s) = 3s / (1 + 2s); [999, 749, 499, 249] -> {1, .9, .75, .5}.
    got = SD35Family(anchors=[999, 749, 499, 249]).anchors((128, 128), 4)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64), atol=1e-12, rtol=0)
    # Two steps of our own choosing: [999, 499] -> {1, .75}.
    torch.testing.assert_close(SD35Family(anchors=[999, 499]).anchors((128, 128), 2),
                               torch.tensor([1.0, 0.75], dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize('anchors, num_steps, message', [
    ([1000, 904, 759], 4, 'has 3 indices but model.num_steps=4'),
    ([1000, 759, 904, 512], 4, 'strictly descending'),
    ([900, 750, 500, 250], 4, 'first anchor must be pure noise'),
    ([1000, 904.5, 759, 512], 4, 'integer'),
])
def test_bad_anchor_indices_are_named(anchors, num_steps, message):
    with pytest.raises(ValueError, match=message):
        FluxFamily(anchors=anchors).anchors((128, 128), num_steps)


def test_anchor_override_reaches_the_model_through_the_yaml_keys():
    from senseflow_algos.models.factory import build_dmd_model

    model = build_dmd_model('sd35', resolution=32, tiny=True, num_steps=2,
                            family_kwargs={'anchors': [999, 499]})
    torch.testing.assert_close(model.sigmas, torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


# -- precomputed conditioning -------------------------------------------------------------------------------------

def test_a_family_with_per_prompt_lengths_refuses_precomputed_data(tmp_path):
    from senseflow_algos.checks.training_data import check_training_data
    from senseflow_algos.config import ConfigError

    assert FAMILIES['qwenimage'].precomputable_conditioning is False
    cfg = {'model': {'family': 'qwenimage'}, 'dataset': {'kind': 'precomputed', 'remote': str(tmp_path)}}
    with pytest.raises(ConfigError, match='dataset.kind=precomputed cannot train model.family=qwenimage'):
        check_training_data(cfg, 'x.yaml')


def test_precompute_tool_refuses_such_a_family():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / 'data_prep' / 'precompute.py'), '--input', '/nonexistent',
                          '--out', '/nonexistent-out', '--family', 'qwenimage', '--tiny', '--resolution', '32'],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and '--family qwenimage: its prompt embeddings have a length per prompt' in out.stderr


@pytest.mark.parametrize('name', ['flux', 'sd35', 'sdxl'])
def test_precomputed_embeddings_of_another_family_are_named(name):
    # The check reads the family's own conditioning shapes: a FLUX batch (T5 4096 wide, pooled 768) fed to a model of
    # another family, or another family's batch fed to FLUX, is refused naming the key.
    from senseflow_algos.models.factory import build_dmd_model

    model = build_dmd_model(name, resolution=32, tiny=True, text_encoders=False)
    other = 'sd35' if name == 'flux' else 'flux'
    shapes = build_dmd_model(other, resolution=32, tiny=True, text_encoders=False)._conditioning_shapes()
    batch = {k: torch.zeros(2, *v.shape[1:]) for k, v in shapes.items()}
    mine = model._conditioning_shapes()
    if all(batch[k].shape[-1] == mine[k].shape[-1] for k in batch if k in mine):
        pytest.skip(f'the tiny {name} and {other} models happen to have the same widths')
    with pytest.raises(ValueError, match=f'but the {name} teacher takes'):
        model.conditioning(batch)


# -- the CFG teachers' constant unconditional prompt is encoded once ----------------------------------------------

def _count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_sd35_empty_prompt_is_encoded_once_and_equals_the_pipelines_negative_branch():
    from diffusers import StableDiffusion3Pipeline

    family = get_family('sd35')
    pipe = family.tiny_pipeline(seed=0)
    conditioner = family.conditioner_from_pipeline(pipe, 77)
    calls = _count_forwards(conditioner.text_encoder_3)
    prompts = ['a red circle above a blue square', 'a small green star', 'two yellow triangles']
    first, second = conditioner(prompts), conditioner(prompts[:2])
    assert len(calls) == 3  # the prompts twice, the empty prompt once
    ref = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                   tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
                                   tokenizer_2=pipe.tokenizer_2, text_encoder_3=pipe.text_encoder_3,
                                   tokenizer_3=pipe.tokenizer_3)
    embeds, neg, pooled, neg_pooled = ref.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=True,
                                                        negative_prompt='', max_sequence_length=77)
    torch.testing.assert_close(first['prompt_embeds'], embeds, rtol=0, atol=0)
    torch.testing.assert_close(first['pooled_prompt_embeds'], pooled, rtol=0, atol=0)
    torch.testing.assert_close(first['negative_prompt_embeds'], neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(first['negative_pooled_prompt_embeds'], neg_pooled, rtol=0, atol=1e-6)
    assert second['negative_prompt_embeds'].shape[0] == 2


def test_qwenimage_negative_prompt_is_encoded_once_and_equals_the_pipelines():
    from diffusers import QwenImagePipeline

    family = get_family('qwenimage')
    pipe = family.tiny_pipeline(seed=0)
    conditioner = family.conditioner_from_pipeline(pipe)
    calls = _count_forwards(conditioner.text_encoder)
    prompts = ['a red circle above a blue square', 'a small green star']
    first, _ = conditioner(prompts), conditioner(prompts)
    assert len(calls) == 3
    ref = QwenImagePipeline(scheduler=None, vae=None, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                            transformer=None)
    neg, _ = ref.encode_prompt([' '] * 2, max_sequence_length=conditioner.max_sequence_length)
    torch.testing.assert_close(first['negative_prompt_embeds'], neg, rtol=0, atol=1e-6)
