"""Attention-head and MLP-width pruning of transformers: module attributes and config follow the measured
shapes, the config rebuilds the pruned model (also in a fresh process), root parameters are pruned, and
models that cannot be pruned are refused before training, naming the fix."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_trust.compression import ProgressivePruning
from lightning_trust.compression.heads import find_attention, find_heads
from lightning_trust.compression.pruner import IMPORTANCES, step_pruner, trace_pruner
from lightning_trust.demo import SmallCNN
from tests.foundation.models import _bert, _bert_lora, _gpt2_cls, _vit
from tests.support import trainer as make_trainer


def _prune(model, example, ratio=0.5):
    pruner, _ = trace_pruner(model, example, lambda m: IMPORTANCES["group_magnitude"](), [])
    heads = find_heads(model)
    step_pruner(pruner, model, ratio, [], {}, heads, heads.attention[0].heads)
    return pruner


def _tokens():
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(3, 64, (3, 10), generator=g),
        "attention_mask": torch.ones(3, 10, dtype=torch.long),
    }


def test_bert_whole_heads_and_mlp_width_with_attributes_and_config():
    torch.manual_seed(0)
    model = _bert().eval()
    dense = {a.name: a.module.query.weight.detach().clone() for a in find_attention(model)}
    heads = find_attention(model)
    # the head torch-pruning keeps: the larger L2 group magnitude of its q/k/v rows (and the coupled o-proj columns)
    _prune(model, _tokens())
    for a in heads:
        assert a.module.num_attention_heads == 1 and a.module.attention_head_size == 16 and a.module.all_head_size == 16
        assert a.module.query.weight.shape == a.module.key.weight.shape == a.module.value.weight.shape == (16, 16)
        kept = dense[a.name].reshape(2, 16, 32)  # rows of each head; columns pruned with the residual stream
        assert any(torch.equal(a.module.query.weight, kept[h][:, cols]) for h in range(2) for cols in [_cols(model)])
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (16, 1, 32)
    assert model.bert.pooler.dense.weight.shape == (16, 16)  # the pooler's width is the config's hidden_size
    fresh = type(model)(cfg).eval()
    fresh.load_state_dict(model.state_dict())  # strict: the config builds exactly the pruned shapes
    with torch.no_grad():
        assert torch.equal(fresh(**_tokens()).logits, model(**_tokens()).logits)


def _cols(model):
    """The residual channels kept: the word embedding's kept columns, found by matching a fresh copy's."""
    torch.manual_seed(0)
    dense = _bert().bert.embeddings.word_embeddings.weight
    pruned = model.bert.embeddings.word_embeddings.weight
    return [int((dense - pruned[:, [j]]).abs().sum(0).argmin()) for j in range(pruned.shape[1])]


def test_pruned_bert_round_trips_save_pretrained_in_a_fresh_process(tmp_path):
    torch.manual_seed(1)
    model = _bert().eval()
    _prune(model, _tokens())
    model.save_pretrained(tmp_path)
    torch.save(_tokens(), tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(**_tokens()).logits, tmp_path / "ref.pt")
    code = (
        "import torch, transformers\n"
        f"m = transformers.BertForSequenceClassification.from_pretrained({str(tmp_path)!r}).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad():\n    out = m(**x).logits\n"
        "print(m.config.num_attention_heads, m.config.hidden_size, m.config.intermediate_size, torch.equal(out, ref))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-4:] == ["1", "16", "32", "True"], done.stdout


def test_vit_root_parameters_are_pruned_with_the_residual_stream():
    torch.manual_seed(0)
    model = _vit().eval()
    x = {"pixel_values": torch.rand(3, 1, 8, 8)}
    cls_dense = model.vit.embeddings.cls_token.detach().clone()
    _prune(model, x)
    emb = model.vit.embeddings
    assert emb.cls_token.shape == (1, 1, 16) and emb.position_embeddings.shape == (1, 5, 16)
    kept = emb.patch_embeddings.projection.weight.shape[0]
    assert kept == 16 and [a.module.num_attention_heads for a in find_attention(model)] == [1, 1]
    # the class token keeps a subset of its dense values (pruned, not re-initialised)
    assert all(bool((cls_dense[0, 0] == v).any()) for v in emb.cls_token[0, 0])
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size) == (16, 1, 32)
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, model(**x).logits)


class _TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class _TimmViT(nn.Module):
    """A timm-style ViT: root ``cls_token``/``pos_embed`` parameters, fused qkv with ``num_heads``/``head_dim``."""

    def __init__(self, dim=32, heads=4, depth=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(dim), "attn": _TimmAttention(dim, heads), "norm2": nn.LayerNorm(dim),
                           "fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim)})
            for _ in range(depth)
        )  # fmt: skip
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for b in self.blocks:
            x = x + b["attn"](b["norm1"](x))
            x = x + b["fc2"](torch.nn.functional.gelu(b["fc1"](b["norm2"](x))))
        return self.head(x[:, 0])


def test_timm_style_vit_with_root_parameters_prunes_whole_heads():
    torch.manual_seed(0)
    model = _TimmViT().eval()
    x = torch.rand(2, 1, 8, 8)
    _prune(model, x)
    attn = model.blocks[0]["attn"]
    assert attn.num_heads == 2 and attn.head_dim == 8 and attn.qkv.out_features == 48
    assert model.cls_token.shape == (1, 1, 16) and model.pos_embed.shape == (1, 5, 16)
    assert model.blocks[0]["fc1"].out_features == 32
    assert model(x).shape == (2, 3)


def test_global_pruning_of_heads_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="set `global_pruning: false`"):
        trace_pruner(_bert().eval(), _tokens(), lambda m: IMPORTANCES["group_magnitude"](), [], global_pruning=True)


def test_lora_wrapped_layers_are_refused_naming_merge_or_prune_first():
    with pytest.raises(ValueError, match=r"LoRA-wrapped.*get_peft_model.*merge_and_unload"):
        trace_pruner(_bert_lora().eval(), _tokens(), lambda m: IMPORTANCES["group_magnitude"](), [])


def test_gpt2_conv1d_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn' is a transformers Conv1D.*split_size"):
        trace_pruner(_gpt2_cls().eval(), _tokens(), lambda m: IMPORTANCES["group_magnitude"](), [])


def test_nothing_to_prune_is_refused():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"nothing to prune in Sequential.*\['0'\]"):
        trace_pruner(model, torch.zeros(2, 4), lambda m: IMPORTANCES["group_magnitude"](), [])
    cnn = SmallCNN()
    every = [n for n, m in cnn.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with pytest.raises(ValueError, match="nothing to prune in SmallCNN"):
        trace_pruner(cnn, torch.zeros(2, 1, 8, 8), lambda m: IMPORTANCES["group_magnitude"](), every)


def test_report_states_the_measured_channel_ratio(tmp_path, digits):
    cb = ProgressivePruning(pruning_ratio=0.5, schedule="one_shot", start_epoch=0, measure_latency=False,
                            evaluate=False, ignored_layers=["features.0"])  # fmt: skip
    model = SmallCNN()
    dense = {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}  # fmt: skip
    make_trainer(tmp_path, [cb], max_epochs=1).fit(model, digits)
    now = {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
           for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}  # fmt: skip
    counted = [n for n in dense if n not in ("features.0", "classifier")]
    expected = 1 - sum(now[n] for n in counted) / sum(dense[n] for n in counted)
    assert cb.report()["channel_ratio"] == pytest.approx(expected) and cb.report()["steps"][0]["target"] == 0.5
    assert now["features.0"] == dense["features.0"]  # ignored, so its channels stay
