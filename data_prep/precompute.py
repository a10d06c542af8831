"""Add per-family text embeddings and VAE latents to an MDS dataset, as typed ``ndarray`` columns.

    python data_prep/precompute.py --input /data/photos-mds --out /data/photos-flux-1024 \\
        --family flux --pretrained black-forest-labs/FLUX.1-dev --resolution 1024 --dtype bf16
    composer -n 8 data_prep/precompute.py ...      # rank-parallel: each rank encodes its own parts

Writes every input column plus

* FLUX: ``prompt_embeds`` (T5 sequence, ``ndarray:float16:512,4096``) and ``pooled_prompt_embeds`` (CLIP pooled);
* SD 3.5: ``prompt_embeds`` (CLIP-L/G + T5, joint) and ``pooled_prompt_embeds`` (CLIP-L + G pooled); the
  empty-prompt embeddings of the CFG branch are the same for every sample and are stored once, in
  ``negative_embeddings.npz`` at the dataset root;
* ``latents``: the normalised VAE latents (posterior mode, ``(z - shift) * scale``) of the image resized and
  centre-cropped to ``--resolution``, exactly as training would encode it online (when the input has images).

and ``senseflow_precompute.json`` (family, teacher, resolution, column shapes) at the root. Train from it with
``dataset.kind=precomputed`` and ``model.text_encoders=false model.vae_encoder=false``. Work is cut into parts of
``--part-size`` samples; a rerun skips the parts that are complete, and under ``composer -n N`` rank ``r`` takes
parts ``r, r+N, ...``; rank 0 merges the index when all are done.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import sys
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from mds_writer import add_writer_args, barrier, rank_world, run_writer

from senseflow_algos.checks.training_data import precompute_refusal
from senseflow_algos.data.samples import BadSampleError, open_image
from senseflow_algos.data.streaming import NEGATIVES_FILE, PRECOMPUTE_META_FILE, image_to_tensor, make_streams
from senseflow_algos.data.uri import join_uri, read_file, write_file
from senseflow_algos.models.families import FAMILIES

#: Input encodings whose decode/encode round trip is lossy: copied as the stored bytes (column becomes ``bytes``).
RAW_COPY_ENCODINGS = ('jpeg',)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Add text embeddings (prompt_embeds, pooled_prompt_embeds; SD 3.5 empty-prompt negatives once '
        'per dataset) and VAE latents at the training resolution to an MDS dataset, so training needs no text '
        'encoder and no VAE encoder. Run under `composer -n N` to split the work over N ranks (GPUs).')
    parser.add_argument('--input', required=True,
                        help='Input MDS dataset (from images_to_mds.py, manifest_to_mds.py or prompts_to_mds.py): a '
                        'local folder or a remote URI.')
    parser.add_argument('--input-cache', default=None,
                        help='Local folder to cache a remote --input in (default: a folder under the system temp).')
    parser.add_argument('--family', required=True, choices=sorted(FAMILIES), help='Teacher family (model.family).')
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument('--pretrained', help='Teacher: hub id or local diffusers folder (model.pretrained); only its '
                       'text encoders, tokenizers and VAE are loaded.')
    group.add_argument('--tiny', action='store_true',
                       help='The tiny random-weight components of model.tiny=true (tests, demos).')
    parser.add_argument('--seed', type=int, default=17,
                        help='With --tiny: the seed of the random weights; must equal the training run seed '
                        '(default: %(default)s, the seed of the tiny configs).')
    parser.add_argument('--revision', default=None, help='Hub revision of --pretrained.')
    parser.add_argument('--family-kwargs', default='{}',
                        help='JSON of family arguments (model.family_kwargs), e.g. \'{"max_sequence_length": 256}\'.')
    parser.add_argument('--resolution', type=int, required=True,
                        help='Training resolution (model.resolution): images are resized and centre-cropped to it '
                        'before VAE encoding.')
    parser.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                        help='Dtype the encoders run in (default: %(default)s).')
    parser.add_argument('--embed-dtype', choices=('float16', 'float32'), default='float16',
                        help='Dtype of the stored arrays (default: %(default)s).')
    parser.add_argument('--batch-size', type=int, default=16, help='Samples encoded at once (default: %(default)s).')
    parser.add_argument('--device', default='auto',
                        help="Device: auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu or cuda.")
    parser.add_argument('--no-latents', action='store_true',
                        help='Only text embeddings (default: latents too when the input has an image column).')
    parser.add_argument('--caption-column', default='caption', help='Input caption column (default: %(default)s).')
    parser.add_argument('--image-column', default='image', help='Input image column (default: %(default)s).')
    add_writer_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _device(name: str) -> torch.device:
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda':
        return torch.device('cuda', local_rank)
    return torch.device(name)


def _split_raw(shard, data: bytes) -> dict[str, bytes]:
    """A sample's stored bytes per column (the layout ``MDSReader.decode_sample`` reads)."""
    sizes, at = [], 0
    for size in shard.column_sizes:
        if size:
            sizes.append(size)
        else:
            sizes.append(int(np.frombuffer(data[at:at + 4], np.uint32)[0]))
            at += 4
    out = {}
    for name, size in zip(shard.column_names, sizes):
        out[name] = data[at:at + size]
        at += size
    return out


class Precomputer:
    """Reads input samples by index and turns chunks of them into output samples with embeddings and latents."""

    def __init__(self, args: argparse.Namespace):
        from streaming import StreamingDataset

        from senseflow_algos.models.factory import build_encoders

        self.args = args
        self.device = _device(args.device)
        self.family_kwargs = json.loads(args.family_kwargs)
        self.family, self.conditioner, self.vae = build_encoders(
            args.family, pretrained=args.pretrained, tiny=args.tiny, revision=args.revision, dtype=args.dtype,
            family_kwargs=self.family_kwargs, seed=args.seed)
        self.conditioner.to(self.device)
        self.vae.to(self.device)
        stream = make_streams([{'remote': args.input, 'local': args.input_cache}])[0]
        self.dataset = StreamingDataset(streams=[stream], shuffle=False, batch_size=1)
        shard0 = self.dataset.shards[0]
        self.input_columns = dict(zip(shard0.column_names, shard0.column_encodings))
        for shard in self.dataset.shards[1:]:
            if dict(zip(shard.column_names, shard.column_encodings)) != self.input_columns:
                raise BadSampleError(f'input shard {shard.raw_data.basename} has columns '
                                     f'{dict(zip(shard.column_names, shard.column_encodings))}, shard '
                                     f'{shard0.raw_data.basename} has {self.input_columns}: mixed datasets')
        if args.caption_column not in self.input_columns:
            raise BadSampleError(f'input {args.input} has no caption column {args.caption_column!r} (columns: '
                                 f'{sorted(self.input_columns)}); choose it with --caption-column')
        self.with_latents = not args.no_latents and args.image_column in self.input_columns
        self.raw_copy = [c for c, e in self.input_columns.items() if e in RAW_COPY_ENCODINGS]
        self.np_dtype = np.dtype(args.embed_dtype)
        # One encoding of the empty prompt fixes the column shapes (and is SD 3.5's negative branch).
        probe = self._encode_text([''])
        self.negatives = {k: v[0] for k, v in probe.items() if k.startswith('negative_')}
        self.new_columns = {k: self._ndarray(v.shape[1:]) for k, v in probe.items() if not k.startswith('negative_')}
        if self.with_latents:
            self.latent_shape = tuple(self.family.latent_shape(self.vae, args.resolution))
            self.new_columns['latents'] = self._ndarray(self.latent_shape)
        self.columns = {c: ('bytes' if c in self.raw_copy else e) for c, e in self.input_columns.items()}
        self.columns.update(self.new_columns)

    def _ndarray(self, shape: Sequence[int]) -> str:
        return f'ndarray:{self.np_dtype.name}:{",".join(str(int(d)) for d in shape)}'

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> dict[str, np.ndarray]:
        cond = self.conditioner(captions)
        return {k: v.float().cpu().numpy() for k, v in cond.items()}

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        return self.family.encode_images(self.vae, pixels.to(self.device)).float().cpu().numpy()

    def _cast(self, name: str, array: np.ndarray) -> np.ndarray:
        out = array.astype(self.np_dtype)
        if not np.isfinite(out).all():
            raise BadSampleError(f'{name} is not finite in {self.np_dtype.name} (overflow? try --embed-dtype float32)')
        return out

    def _load(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset.get_item(index))
        if self.raw_copy:
            shard_id, shard_sample = self.dataset.spanner[index]
            shard = self.dataset.shards[shard_id]
            raw = _split_raw(shard, shard.get_sample_data(shard_sample))
            sample.update({c: raw[c] for c in self.raw_copy})
        return sample

    def _where(self, index: int, sample: dict[str, Any] | None = None) -> str:
        shard_id, shard_sample = self.dataset.spanner[index]
        where = f'input shard {self.dataset.shards[shard_id].raw_data.basename}, sample {shard_sample}'
        key = (sample or {}).get('key')
        return where + (f', key {key!r}' if isinstance(key, str) else '')

    def make_samples(self, chunk: Sequence[int], indices: Iterable[int]):
        """``write_parts`` callback: yields ``(index, output sample or BadSampleError)`` in input order."""
        indices = list(indices)
        bs = self.args.batch_size
        for lo in range(0, len(indices), bs):
            batch = indices[lo:lo + bs]
            samples, pixels, results = {}, {}, {}
            for index in batch:
                sample = self._load(index)
                try:
                    caption = sample[self.args.caption_column]
                    if not isinstance(caption, str) or not caption.strip():
                        raise BadSampleError('empty caption')
                    if self.with_latents:
                        pixels[index] = image_to_tensor(open_image(sample[self.args.image_column]),
                                                        self.args.resolution)
                    samples[index] = sample
                except BadSampleError as e:
                    results[index] = BadSampleError(f'{self._where(index, sample)}: {e}')
            good = list(samples)
            if good:
                text = self._encode_text([samples[i][self.args.caption_column] for i in good])
                latents = self._encode_images(torch.stack([pixels[i] for i in good])) if self.with_latents else None
                for n, index in enumerate(good):
                    out = {c: samples[index][c] for c in self.input_columns}
                    try:
                        for name in self.new_columns:
                            out[name] = self._cast(name, latents[n] if name == 'latents' else text[name][n])
                    except BadSampleError as e:
                        results[index] = BadSampleError(f'{self._where(index, out)}: {e}')
                        continue
                    results[index] = out
            for index in batch:
                yield index, results[index]

    def input_fingerprint(self) -> str:
        index = read_file(join_uri(self.args.input, 'index.json'))
        return hashlib.sha256(index or b'').hexdigest()

    def metadata(self) -> dict[str, Any]:
        a = self.args
        return {
            'family': a.family, 'family_kwargs': self.family_kwargs, 'pretrained': a.pretrained,
            'revision': a.revision, 'tiny': bool(a.tiny), 'seed': a.seed if a.tiny else None, 'dtype': a.dtype,
            'resolution': a.resolution, 'latents': self.with_latents,
            'latent_shape': list(self.latent_shape) if self.with_latents else None,
            'columns': self.new_columns, 'negatives': NEGATIVES_FILE if self.negatives else None,
            'caption_column': a.caption_column, 'image_column': a.image_column if self.with_latents else None,
            'input': a.input,
        }

    def write_metadata(self, command: str) -> None:
        if self.negatives:
            buf = io.BytesIO()
            np.savez(buf, **{k: v.astype(np.float32) for k, v in self.negatives.items()})
            write_file(self.args.out, NEGATIVES_FILE, buf.getvalue())
        meta = dict(self.metadata(), command=command)
        write_file(self.args.out, PRECOMPUTE_META_FILE, json.dumps(meta, indent=1).encode())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    _, world = rank_world()
    if world > 1:
        barrier()  # process group first: StreamingDataset synchronises its ranks through it
    if args.batch_size < 1:
        raise SystemExit('error: --batch-size must be >= 1')
    refusal = precompute_refusal(args.family)
    if refusal:
        raise SystemExit(f'error: --family {args.family}: {refusal}')
    pre = Precomputer(args)
    state = dict(pre.metadata(), tool='precompute', input_fingerprint=pre.input_fingerprint(),
                 embed_dtype=args.embed_dtype)
    records = list(range(pre.dataset.num_samples))
    run_writer(args, records, pre.columns, pre.make_samples, state, desc='precompute',
               after_merge=lambda: pre.write_metadata(command))
    return 0


if __name__ == '__main__':
    sys.exit(main())
