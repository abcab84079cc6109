"""Checkpoints in and out, against the real peer libraries (requirements-test.txt): exports load strictly
into timm's VisionTransformer / Beit with the same features; MAE, DeiT, DINO, BEiT and SimMIM files written
as those repositories write them load wherever a checkpoint is read; a pickle that would run code is
refused everywhere; CLIP against OpenAI's `clip`, the VQGAN tokenizer against taming's modules, the MAE and
SimMIM losses against transformers' ViTMAEForPreTraining / ViTForMaskedImageModeling. Each test skips
without its library."""
import argparse
import functools  # noqa: F401 (the printed timm lines may use it)
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import common
import deepmim
import evaluate
import maskdistill
import simmim
import supmim
from utils import METHOD_FLAGS, MODEL_CLASS

timm = pytest.importorskip('timm')
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomize(model, seed=0):
    """Every parameter random (LayerNorm gains near 1), so that each name mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.ndim == 1 and ('norm' in name or 'ln_' in name) and name.endswith('weight')
            p.copy_((1.0 if gain else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def export(tmp_path, ckpt, capsys, *flags):
    """evaluate.py export of the file `ckpt`: (the written file, the timm model built and loaded strictly
    by running the two printed lines)."""
    out = str(tmp_path / 'export.pth')
    capsys.readouterr()
    evaluate.main(['export', '--ckpt', str(ckpt), '--out', out, *flags])
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith('timm: model = '))
    env = {'timm': timm, 'torch': torch, 'functools': functools}
    exec(lines[i][len('timm: '):] + '\n' + lines[i + 1].strip(), env)  # load_state_dict is strict
    return torch.load(out, weights_only=True), env['model'].eval()


def timm_name(line):
    return line.split("'")[1] if line.startswith('timm.create_model(') else None


# ----------------------------------------------------------------------------------------------
# Export -> timm


@pytest.mark.parametrize('size', list(common.MODELS))
@pytest.mark.parametrize('layout', ['vit', 'beit'])
def test_every_size_exports_to_timm(size, layout, tmp_path, capsys):
    """At full size on the meta device: the printed construction has exactly our keys and shapes (and a
    real timm name at 224 px); at 32 px with one block: strict load and equal features (up to ViT-B's
    width: L and H cost seconds each on a CPU and split heads by the same code)."""
    width, depth, heads = common.model_size(size)
    p = 14 if size == 'vit_huge' else 16
    kw = dict(embed_dim=width, num_heads=heads, patch_size=p)
    if layout == 'beit':  # MaskDistill's / SimMIM's released encoder: shared relative position bias, layer scale
        kw.update(rel_pos_bias=True, init_values=0.1, pos_embed='none')
    with torch.device('meta'):
        ours = common.VisionTransformer(img_size=224, depth=depth, **kw)
        line = evaluate.timm_model(ours.encoder_kwargs)
        theirs = eval(line)
    if size != 'vit_pico' and (layout == 'vit' or size in ('vit_base', 'vit_large')):
        assert timm_name(line) in timm.list_models(), line
    else:
        assert timm_name(line) is None, line  # no such timm model: the class itself
    sd = ours.state_dict()
    sd = evaluate.to_beit(sd) if layout == 'beit' else sd
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    if width > 768:
        return
    small = randomize(common.VisionTransformer(img_size=32, depth=1, **{**kw, 'patch_size': 8}))
    torch.save({'model': small.state_dict(), 'encoder_kwargs': small.encoder_kwargs}, tmp_path / 'ckpt.pth')
    _, model = export(tmp_path, tmp_path / 'ckpt.pth', capsys)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(X), small.forward_features(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('method', list(MODEL_CLASS))
def test_every_method_encoder_exports_to_timm(method, tmp_path, capsys):
    module = __import__(method)
    argv = ['--data', 'synthetic', '--model', 'vit_pico', '--img-size', '32', '--patch-size', '8', '--device', 'cpu',
            '--output-dir', str(tmp_path)]
    args = module.get_args(argv + METHOD_FLAGS[method](str(tmp_path), dict(img_size=32, patch_size=8)))
    net = randomize(getattr(module, MODEL_CLASS[method])(args))
    frozen = tuple(getattr(net, 'frozen_prefixes', ())) or ('\0',)
    torch.save({'model': {k: v for k, v in net.state_dict().items() if not k.startswith(frozen)},
                'encoder_kwargs': net.encoder_kwargs}, tmp_path / 'checkpoint.pth')
    f, model = export(tmp_path, tmp_path / 'checkpoint.pth', capsys)
    assert isinstance(model, timm.models.beit.Beit) == bool(net.encoder_kwargs['rel_pos_bias'])
    with torch.no_grad():
        want = common.VisionTransformer.forward_features(net, X)
        torch.testing.assert_close(model.forward_features(X), want, atol=1e-5, rtol=1e-5)
        back = common.build_encoder(str(tmp_path / 'export.pth'))[0].eval()  # and back into ours, exactly
        torch.testing.assert_close(back.forward_features(X), want, atol=1e-5, rtol=1e-5)


def test_bare_state_dict_of_an_odd_width_needs_num_heads(tmp_path, capsys):
    vit = randomize(common.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2))
    torch.save(vit.state_dict(), tmp_path / 'bare.pth')
    with pytest.raises(common.UsageError, match='--num-heads'):
        common.build_encoder(str(tmp_path / 'bare.pth'))
    f, model = export(tmp_path, tmp_path / 'bare.pth', capsys, '--num-heads', '2')
    assert f['encoder_kwargs']['num_heads'] == 2
    back = common.build_encoder(str(tmp_path / 'export.pth'))[0].eval()  # the export carries the head count
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(X), vit.forward_features(X), atol=1e-5, rtol=1e-5)
    # vit_pico (96 wide) as a bare state dict: 3 heads from common.MODELS, not 96 / 64
    pico = randomize(common.VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3))
    torch.save(pico.state_dict(), tmp_path / 'pico.pth')
    back = common.build_encoder(str(tmp_path / 'pico.pth'))[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(X), pico.forward_features(X), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Training checkpoints of MAE, DeiT, DINO, as their repositories save them


def training_files(tmp_path):
    """{name: (path, the ViT its encoder must equal)}: MAE's main_pretrain, DeiT's main (timm scheduler,
    model EMA, 1000-class head) and DINO's main_dino (student and teacher with projection heads)."""
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV2
    vit = randomize(common.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3))
    opt = torch.optim.AdamW(vit.parameters())
    vit(X).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler('cpu').state_dict()
    args = argparse.Namespace(model='mae_vit_tiny', batch_size=64, lr=None, blr=1.5e-4, output_dir='./out', distributed=False)
    files = {}
    mae = {**vit.state_dict(), 'mask_token': torch.zeros(1, 1, 64), 'decoder_embed.weight': torch.zeros(64, 192)}
    files['mae'] = {'model': mae, 'optimizer': opt.state_dict(), 'epoch': 3, 'scaler': scaler, 'args': args}
    deit = randomize(common.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=1000))
    files['deit'] = {'model': deit.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 3, 'scaler': scaler, 'args': args,
                     'lr_scheduler': CosineLRScheduler(opt, t_initial=300, warmup_t=5).state_dict(),
                     'model_ema': ModelEmaV2(deit).module.state_dict()}
    head = {'head.mlp.0.weight': torch.randn(256, 192), 'head.last_layer.weight_g': torch.ones(1024, 1),
            'head.last_layer.weight_v': torch.randn(1024, 256)}
    teacher = randomize(common.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3), seed=1)
    files['dino'] = {'student': {f'module.backbone.{k}' if not k.startswith('head.') else f'module.{k}': v
                                 for k, v in {**vit.state_dict(), **head}.items()},
                     'teacher': {**{f'backbone.{k}': v for k, v in teacher.state_dict().items()}, **head},
                     'optimizer': opt.state_dict(), 'epoch': 3, 'args': args, 'dino_loss': {'center': torch.zeros(1, 1024)}}
    out = {}
    for name, ckpt in files.items():
        torch.save(ckpt, tmp_path / f'{name}.pth')
        out[name] = (str(tmp_path / f'{name}.pth'), {'mae': vit, 'deit': deit, 'dino': teacher}[name])
    return out


def test_training_checkpoints_load_everywhere(tmp_path, capsys):
    for name, (path, src) in training_files(tmp_path).items():
        with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses them: the allowlist matters
            torch.load(path, weights_only=True)
        with torch.no_grad():
            last = src.run_blocks(src.add_cls(src.add_pos(src.patch_embed(X))))
            want = src.norm(last)
        for vit in [common.build_encoder(path)[0],  # knn, linear, retrieval, analyses
                    common.build_encoder(path, global_pool='avg', num_classes=10)[0],  # fine-tuning init
                    maskdistill.load_teacher(argparse.Namespace(teacher=path, teacher_type='timm', teacher_proj=False,
                                                                teacher_ln_post=True), (4, 4)).vit]:
            with torch.no_grad():  # the last block's tokens (the final norm differs with mean pooling)
                torch.testing.assert_close(vit.eval().run_blocks(vit.add_cls(vit.add_pos(vit.patch_embed(X)))), last, atol=1e-5, rtol=1e-5)
        out = capsys.readouterr().out
        if name == 'deit':  # the 1000-class head does not fit 10 classes: dropped, with a line, as MAE does
            assert 'not loading head.weight (1000, 192)' in out
        if name == 'dino':
            assert 'not loading the projection head' in out
        f, model = export(tmp_path, path, capsys)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(X), want, atol=1e-5, rtol=1e-5)


def test_full_mae_checkpoint_as_hybrid_mae(tmp_path):
    args = deepmim.get_args(['--data', 'synthetic', '--model', 'vit_pico', '--img-size', '32', '--patch-size', '8',
                             '--taps', '', '--decoder-dim', '32', '--decoder-depth', '1', '--decoder-heads', '2'])
    mae = randomize(deepmim.DeepMIM(args))
    torch.save({'model': mae.state_dict(), 'optimizer': {}, 'epoch': 1, 'scaler': {}, 'args': argparse.Namespace(lr=1e-3)},
               tmp_path / 'mae_full.pth')
    args.hybrid_mae, args.hybrid_model = str(tmp_path / 'mae_full.pth'), 'vit_pico'
    loaded = deepmim.load_hybrid_mae(args)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in mae.state_dict().items())


# ----------------------------------------------------------------------------------------------
# A pickle that would run code is refused by every flag that reads a file


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling would call exec(...): write a file
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


TINY = ['--data', 'synthetic', '--model', 'vit_pico', '--img-size', '32', '--patch-size', '8', '--batch-size', '4',
        '--synthetic-size', '8', '--epochs', '1', '--num-workers', '0', '--device', 'cpu']
FLAGS = {  # flag: (script, argv with EVIL for the file and OUT for the output folder)
    'simmim --resume': (simmim, TINY + ['--mask-patch-size', '16', '--output-dir', 'OUT', '--resume']),
    'evaluate knn --ckpt': (evaluate, ['knn', '--ckpt', 'EVIL', '--data', 'synthetic']),
    'evaluate export --ckpt': (evaluate, ['export', '--ckpt', 'EVIL', '--out', 'OUT/x.pth']),
    'evaluate finetune --ckpt': (evaluate, ['finetune', '--ckpt', 'EVIL', '--data', 'synthetic', '--num-workers', '0',
                                            '--output-dir', 'OUT', '--device', 'cpu']),
    'evaluate reconstruct --ckpt': (evaluate, ['reconstruct', '--ckpt', 'EVIL', '--data', 'synthetic']),
    'evaluate --format clip --ckpt': (evaluate, ['knn', '--ckpt', 'EVIL', '--format', 'clip', '--data', 'synthetic']),
    'maskdistill --teacher (clip)': (maskdistill, TINY + ['--teacher', 'EVIL', '--output-dir', 'OUT']),
    'maskdistill --teacher (timm)': (maskdistill, TINY + ['--teacher', 'EVIL', '--teacher-type', 'timm', '--output-dir', 'OUT']),
    'deepmim --teacher': (deepmim, TINY + ['--taps', '2', '--target', 'clip', '--teacher', 'EVIL', '--output-dir', 'OUT']),
    'deepmim --hybrid-mae': (deepmim, TINY + ['--taps', '2', '--hybrid-mae', 'EVIL', '--output-dir', 'OUT']),
    'supmim --tokenizer': (supmim, TINY + ['--tokenizer', 'EVIL', '--output-dir', 'OUT']),
}


@pytest.mark.parametrize('flag', list(FLAGS))
def test_code_running_pickle_is_refused(flag, tmp_path, monkeypatch, capsys):
    module, argv = FLAGS[flag]
    (tmp_path / 'out').mkdir()
    evil, marker = tmp_path / ('out/checkpoint.pth' if '--resume' in flag else 'evil.pth'), tmp_path / 'ran'
    torch.save({'model': {'w': torch.zeros(1)}, 'args': Payload(str(marker))}, evil)
    argv = [str(evil) if a == 'EVIL' else a.replace('OUT', str(tmp_path / 'out')) for a in argv]
    monkeypatch.setattr(sys, 'argv', [module.__name__ + '.py'] + argv)
    with pytest.raises(SystemExit) as e:
        common.run(lambda: module.main(argv) if module is evaluate else module.main())
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and str(evil) in err, err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# OpenAI CLIP


def test_clip_loader_matches_openai_clip(tmp_path):
    """clip.model's CLIP at ViT-B/16's layout (tiny widths): its state dict (fp32; fp16 through
    build_model as clip.load does) and a TorchScript archive of it, against its own image tower."""
    clip_model = pytest.importorskip('clip.model')
    torch.manual_seed(0)
    model = randomize(clip_model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                                      context_length=8, vocab_size=50, transformer_width=64, transformer_heads=1,
                                      transformer_layers=1))
    sd = model.state_dict()
    torch.save(sd, tmp_path / 'fp32.pt')
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / 'fp16.pt')
    torch.jit.save(torch.jit.trace(model, (X, torch.zeros(2, 8, dtype=torch.long))), str(tmp_path / 'jit.pt'))
    fp16 = clip_model.build_model({k: v.half() for k, v in sd.items()}).float().eval()  # sizes read off the keys
    for name, ref in [('fp32.pt', model), ('jit.pt', model), ('fp16.pt', fp16)]:
        tokens = []
        hook = ref.visual.transformer.register_forward_hook(lambda m, i, o: tokens.append(o.permute(1, 0, 2)))  # [B, N, D]
        with torch.no_grad():
            cls = ref.visual(X)  # ln_post(cls) @ proj
            hook.remove()
            vit, proj = common.load_clip_visual(str(tmp_path / name))
            last = vit.run_blocks(vit.add_cls(vit.add_pos(vit.patch_embed(X))))
            x = vit.norm(last)
        torch.testing.assert_close(last, tokens[0], atol=1e-5, rtol=1e-5)  # every token, before ln_post
        torch.testing.assert_close(x, ref.visual.ln_post(tokens[0]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x[:, 0] @ proj, cls, atol=1e-5, rtol=1e-5)


def test_unreadable_clip_file_is_one_line_without_torch_warnings(tmp_path, capsys):
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    argv = ['knn', '--ckpt', str(tmp_path / 'junk.pt'), '--format', 'clip', '--data', 'synthetic']
    with pytest.raises(SystemExit), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')  # torch.jit.load's FutureWarning would print two more lines
        common.run(lambda: evaluate.main(argv))
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not caught


# ----------------------------------------------------------------------------------------------
# VQGAN f16/1024 against taming's modules; a Lightning last.ckpt without Lightning

F16 = dict(ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2)  # vqgan_imagenet_f16_1024's structure, narrower channels


def fake_module(name, **attrs):
    """A module made up on the spot, so that pickle writes these classes under Lightning's / yacs' names."""
    mod = types.ModuleType(name)
    for cls_name, base in attrs.items():
        cls = type(cls_name, (base,), {'__module__': name})
        setattr(mod, cls_name, cls)
    return mod


def lightning_ckpt(path, state_dict, monkeypatch):
    """last.ckpt as PyTorch Lightning 1.x writes it: callback states keyed by the ModelCheckpoint class,
    hyper-parameters as an AttributeDict."""
    cb = fake_module('pytorch_lightning.callbacks.model_checkpoint', ModelCheckpoint=object)
    parsing = fake_module('pytorch_lightning.utilities.parsing', AttributeDict=dict)
    with monkeypatch.context() as m:
        for mod in [cb, parsing] + [fake_module(n) for n in ('pytorch_lightning', 'pytorch_lightning.callbacks',
                                                               'pytorch_lightning.utilities')]:
            m.setitem(sys.modules, mod.__name__, mod)
        hp = parsing.AttributeDict(embed_dim=256, n_embed=1024)
        hp.extra = 'set as an attribute'
        torch.save({'epoch': 5, 'global_step': 10, 'pytorch-lightning_version': '1.0.8', 'state_dict': state_dict,
                    'callbacks': {cb.ModelCheckpoint: {'monitor': 'val/rec_loss', 'best_model_score': torch.tensor(0.5)}},
                    'optimizer_states': [], 'lr_schedulers': [], 'hyper_parameters': hp}, path)
    assert 'pytorch_lightning' not in sys.modules


def taming_vqgan(ch=32, z=32, resolution=64, seed=0):
    mod = pytest.importorskip('taming.modules.diffusionmodules.model')
    quantize = pytest.importorskip('taming.modules.vqvae.quantize')
    torch.manual_seed(seed)
    enc = mod.Encoder(ch=ch, out_ch=3, in_channels=3, resolution=resolution, z_channels=z, double_z=False,
                      attn_resolutions=[resolution // 16], dropout=0.0, **F16)  # attention at the last level, as f16
    parts = torch.nn.ModuleDict({'encoder': enc, 'quant_conv': torch.nn.Conv2d(z, z, 1),
                                 'quantize': quantize.VectorQuantizer2(1024, z, beta=0.25)})
    randomize(parts, seed)
    with torch.no_grad():
        parts.quantize.embedding.weight.mul_(10)  # codes spread like the activations, so ties are unlikely
    return parts


def taming_ids(parts, x):  # VQModel.encode: encoder, quant_conv, quantize -> info[2], the code indices
    with torch.no_grad():
        return parts.quantize(parts.quant_conv(parts.encoder(x)))[2][2].reshape(x.shape[0], -1)


def test_vqgan_ids_match_taming_and_last_ckpt_loads_without_lightning(tmp_path, monkeypatch):
    parts = taming_vqgan()
    path = tmp_path / 'last.ckpt'
    lightning_ckpt(path, {**parts.state_dict(), 'decoder.conv_in.weight': torch.zeros(1), 'loss.logvar': torch.zeros(())},
                   monkeypatch)
    with pytest.raises(pickle.UnpicklingError):  # Lightning's classes are not on torch's own allowlist
        torch.load(path, weights_only=True)
    tok = supmim.load_vqgan(str(path))
    assert supmim.vqgan_config(tok.state_dict())['attn_levels'] == (4,)
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = taming_ids(parts, x)
    assert want.unique().numel() > 8  # many codes in use: the comparison is not trivial
    assert torch.equal(tok.tokenize(x), want)  # fp32: all ids equal


def test_vqgan_ids_under_training_autocast_match_taming_fp32(tmp_path, monkeypatch):
    parts = taming_vqgan(seed=1)
    torch.save({'state_dict': parts.state_dict()}, tmp_path / 'vq.pt')
    tok = supmim.load_vqgan(str(tmp_path / 'vq.pt'))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1  # (bf16 convolutions are slow on a CPU)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # as the training step (bf16 on CPU here)
        got = tok.tokenize(x)
    assert torch.equal(got, taming_ids(parts, x))


# ----------------------------------------------------------------------------------------------
# Official SimMIM, BEiT, BEiT v2 files against timm's Beit


def official(beit, extra):
    """timm Beit's state dict in the official layout (timm's checkpoint_filter_fn maps official -> timm by
    dropping the stored relative_position_index): the indices put back, plus the official extra keys."""
    from timm.models.beit import gen_relative_position_index
    sd = dict(beit.state_dict())
    grid = beit.patch_embed.grid_size
    for name, m in beit.named_modules():
        if getattr(m, 'relative_position_bias_table', None) is not None:
            sd[f'{name}.relative_position_index'] = gen_relative_position_index(grid)
    return {**sd, **extra}


BEITS = {  # name: (timm Beit kwargs, extra official keys, wrapping)
    'beit_pretrain': (dict(use_abs_pos_emb=False, use_shared_rel_pos_bias=True),
                      {'mask_token': torch.zeros(1, 1, 96), 'lm_head.weight': torch.zeros(8192, 96)}, 'model'),
    'beitv2_pretrain': (dict(use_abs_pos_emb=True, use_shared_rel_pos_bias=True),
                        {'mask_token': torch.zeros(1, 1, 96), 'lm_head.weight': torch.zeros(8192, 96),
                         'cls_pt_layers.0.gamma_1': torch.zeros(96), 'cls_pt_layers.0.attn.q_bias': torch.zeros(96),
                         'cls_pt_layers.0.attn.v_bias': torch.zeros(96)}, 'model'),
    'beit_finetuned': (dict(use_abs_pos_emb=False, use_rel_pos_bias=True, global_pool='avg', num_classes=1000), {}, 'model'),
    'simmim_pretrain': (dict(use_abs_pos_emb=False, use_shared_rel_pos_bias=True),
                        {'mask_token': torch.zeros(1, 1, 96), 'decoder.0.weight': torch.zeros(192, 96, 1, 1)}, 'encoder.'),
}


@pytest.mark.parametrize('name', list(BEITS))
def test_official_beit_and_simmim_files_give_timm_beit_features(name, tmp_path, monkeypatch, capsys):
    kw, extra, wrap = BEITS[name]
    beit = randomize(timm.models.beit.Beit(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3,
                                           init_values=0.1, **{'num_classes': 0, 'global_pool': 'token', **kw}))
    sd = official(beit, extra)
    if wrap == 'encoder.':  # SimMIM's main_simmim save_checkpoint: the ViT under `encoder.`, the yacs config
        yacs = fake_module('yacs.config', CfgNode=dict)
        with monkeypatch.context() as m:
            m.setitem(sys.modules, 'yacs', fake_module('yacs'))
            m.setitem(sys.modules, 'yacs.config', yacs)
            cfg = yacs.CfgNode(MODEL=yacs.CfgNode(TYPE='vit'))
            cfg.__dict__['__immutable__'] = True
            torch.save({'model': {f'encoder.{k}' if k != 'decoder.0.weight' else k: v for k, v in sd.items()},
                        'optimizer': {}, 'lr_scheduler': {}, 'epoch': 799, 'config': cfg}, tmp_path / 'f.pth')
    else:
        torch.save({'model': sd, 'args': argparse.Namespace(model='beit_base_patch16_224')}, tmp_path / 'f.pth')
    path = str(tmp_path / 'f.pth')
    vit = common.build_encoder(path)[0].eval()
    with torch.no_grad():
        want = beit.forward_features(X)
        torch.testing.assert_close(vit.forward_features(X), want, atol=1e-5, rtol=1e-5)  # patch features to 1e-5
        if name == 'beit_finetuned':
            ft = common.build_encoder(path, num_classes=1000)[0].eval()  # per-block bias, mean pooling, its head
            torch.testing.assert_close(ft(X), beit(X), atol=1e-5, rtol=1e-5)
    teacher = maskdistill.load_teacher(argparse.Namespace(teacher=path, teacher_type='timm', teacher_proj=False,
                                                          teacher_ln_post=True), (4, 4))
    assert teacher.vit.encoder_kwargs == vit.encoder_kwargs
    _, model = export(tmp_path, path, capsys)  # and out again, in timm's Beit layout
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(X), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The MAE loss against transformers' ViTMAEForPreTraining

HF_BLOCK = [('norm1', 'layernorm_before'), ('attn.proj', 'attention.o_proj'), ('norm2', 'layernorm_after'),
            ('mlp.fc1', 'mlp.fc1'), ('mlp.fc2', 'mlp.fc2')]


def to_hf(sd, depth, dec_depth=0):
    """Our (official MAE) names -> transformers' (5.x) ViTMAE / ViT names; qkv split into q, k, v projections."""
    out = {'vit.embeddings.cls_token': sd['cls_token'], 'vit.embeddings.position_embeddings': sd['pos_embed']}
    names = [('patch_embed.proj', 'vit.embeddings.patch_embeddings.projection'), ('norm', 'vit.layernorm')]
    if dec_depth:
        out.update({'decoder.mask_token': sd['mask_token'], 'decoder.decoder_pos_embed': sd['decoder_pos_embed']})
        names += [('decoder_embed', 'decoder.decoder_embed'), ('decoder_norm', 'decoder.decoder_norm'),
                  ('decoder_pred', 'decoder.decoder_pred')]
    for ours, hf, n in [('blocks', 'vit.layers', depth), ('decoder_blocks', 'decoder.decoder_layers', dec_depth)]:
        names += [(f'{ours}.{i}.{a}', f'{hf}.{i}.{b}') for i in range(n) for a, b in HF_BLOCK]
        for i in range(n):
            for t in ('weight', 'bias'):
                for part, v in zip('qkv', sd[f'{ours}.{i}.attn.qkv.{t}'].chunk(3)):
                    out[f'{hf}.{i}.attention.{part}_proj.{t}'] = v
    for a, b in names:
        for t in ('weight', 'bias'):
            out[f'{b}.{t}'] = sd[f'{a}.{t}']
    return out


def test_mae_loss_matches_transformers():
    transformers = pytest.importorskip('transformers')
    args = deepmim.get_args(['--data', 'synthetic', '--model', 'vit_pico', '--img-size', '32', '--patch-size', '8',
                             '--taps', '', '--decoder-dim', '32', '--decoder-depth', '2', '--decoder-heads', '2'])
    ours = randomize(deepmim.DeepMIM(args))
    cfg = transformers.ViTMAEConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384,
                                    image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=2,
                                    decoder_num_attention_heads=2, decoder_intermediate_size=128, mask_ratio=0.75,
                                    norm_pix_loss=True, layer_norm_eps=1e-6, hidden_act='gelu', qkv_bias=True)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    hf.load_state_dict(to_hf(ours.state_dict(), 4, 2))
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids_keep, mask, ids_restore = common.random_masking(noise, 0.75)
        pred = ours.predict(X, ids_keep, ids_restore)[-1]
        loss = deepmim.forward_loss(pred, common.patchify(X, 8), mask, norm_pix_loss=True)
        out = hf(pixel_values=X, noise=noise)
    torch.testing.assert_close(out.mask, mask)
    torch.testing.assert_close(out.logits, pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)


def test_simmim_loss_matches_transformers():
    """The paper's plain-ViT SimMIM against ViTForMaskedImageModeling (SimMIM's 1x1 conv + PixelShuffle head:
    our linear head's rows reordered from (p, q, c) to (c, p, q))."""
    transformers = pytest.importorskip('transformers')
    args = simmim.get_args(['--data', 'synthetic', '--model', 'vit_pico', '--img-size', '32', '--patch-size', '8',
                            '--mask-patch-size', '16'])
    args.rel_pos_bias, args.layer_scale = False, None  # the paper's plain ViT, as transformers' ViT
    ours = randomize(simmim.SimMIM(args))
    cfg = transformers.ViTConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384,
                                 image_size=32, patch_size=8, encoder_stride=8, layer_norm_eps=1e-6, hidden_act='gelu')
    hf = transformers.ViTForMaskedImageModeling(cfg).eval()
    sd = ours.state_dict()
    w = sd['head_pred.weight'].reshape(8, 8, 3, 96).permute(2, 0, 1, 3).reshape(192, 96, 1, 1)
    b = sd['head_pred.bias'].reshape(8, 8, 3).permute(2, 0, 1).reshape(192)
    hf.load_state_dict({**to_hf(sd, 4), 'vit.embeddings.mask_token': sd['mask_token'], 'decoder.0.weight': w, 'decoder.0.bias': b})
    mask = torch.from_numpy(simmim.simmim_mask(np.random.default_rng(0), 32, 16, 8, 0.6)).flatten()[None].repeat(2, 1)
    with torch.no_grad():
        loss, _ = ours({'img': X, 'mask': mask})
        out = hf(pixel_values=X, bool_masked_pos=mask.bool())
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)
