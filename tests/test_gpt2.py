"""GPT-2 model and Hugging Face checkpoints: numerical identity with a reference forward written here
from the tensors alone, causality, loading errors, and the save_pretrained round trip."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, hf_gpt2_config, hf_gpt2_state_dict, write_hf_checkpoint
from safetensors.torch import load_file, save_file

import gpt2
from gpt2 import GPT, GPTConfig


def reference_logits(hf: dict[str, torch.Tensor], n_head: int, idx: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """GPT-2's forward pass over the Hugging Face tensors, in float64 and elementary ops only:
    Conv1D is x @ W + b with W (in, out), GELU is the tanh form, attention masks the future by hand."""
    w = {k.removeprefix("transformer."): v.double() for k, v in hf.items()}
    n_layer = sum(k.endswith("ln_1.weight") for k in w)
    B, T = idx.shape
    C = w["wte.weight"].shape[1]

    def layer_norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def conv1d(x, name):
        return x @ w[name + ".weight"] + w[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # (T, T): True where key position > query position
    x = w["wte.weight"][idx] + w["wpe.weight"][:T]  # (B, T, C)
    for i in range(n_layer):
        p = f"h.{i}."
        q, k, v = conv1d(layer_norm(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=-1)
        q, k, v = (t.reshape(B, T, n_head, C // n_head).permute(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, hd)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(C // n_head)).masked_fill(future, float("-inf"))
        y = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, T, C)
        x = x + conv1d(y, p + "attn.c_proj")
        x = x + conv1d(gelu(conv1d(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return layer_norm(x, "ln_f") @ w["wte.weight"].T  # (B, T, vocab): the head is wte itself


def max_diff(model: GPT, hf: dict[str, torch.Tensor], n_head: int, idx: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(idx)
    return (logits.double() - reference_logits(hf, n_head, idx)).abs().max().item()


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))


# ---- numerical identity with the reference ----


@pytest.mark.parametrize("n_head", [2, 4])  # same shapes, different attention: only config.json can tell
@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
@pytest.mark.parametrize("prefix", [True, False], ids=["transformer.", "no-prefix"])
def test_logits_match_reference_with_config(tmp_path, idx, prefix, as_file, n_head):
    folder = write_hf_checkpoint(tmp_path / "ckpt", prefix=prefix, n_head=n_head)
    model = GPT.from_pretrained(str(folder / "model.safetensors" if as_file else folder))
    assert not model.training
    assert model.config.n_head == n_head
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading
    assert max_diff(model, load_file(folder / "model.safetensors"), n_head, idx) <= 1e-4


@pytest.mark.parametrize("prefix", [True, False], ids=["transformer.", "no-prefix"])
def test_logits_match_reference_without_config(tmp_path, idx, prefix):
    # Without config.json, n_head comes from GPT-2's head size of 64: 128 dims are 2 heads
    folder = write_hf_checkpoint(tmp_path / "ckpt", prefix=prefix, with_config=False, n_head=2, n_embd=128, n_positions=64)
    model = GPT.from_pretrained(str(folder))
    assert (model.config.n_head, model.config.block_size, model.config.n_layer) == (2, 64, 2)
    assert max_diff(model, load_file(folder / "model.safetensors"), 2, idx) <= 1e-4


def test_config_json_fields_are_read(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "ckpt", n_positions=48, n_layer=3)
    config = json.loads((folder / "config.json").read_text())
    del config["n_positions"]  # older configs name it n_ctx only
    config["layer_norm_epsilon"] = 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    c = GPT.from_pretrained(str(folder)).config
    assert (c.block_size, c.n_layer, c.n_head, c.n_embd, c.layer_norm_epsilon) == (48, 3, 2, 32, 1e-6)


def test_tied_lm_head_and_masked_bias_in_the_file_are_accepted(tmp_path, idx):
    hf = hf_gpt2_state_dict(**TINY)
    hf["lm_head.weight"] = hf["transformer.wte.weight"].clone()
    hf["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(hf, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_gpt2_config(**TINY)))
    assert max_diff(GPT.from_pretrained(str(tmp_path)), hf, TINY["n_head"], idx) <= 1e-4


# ---- causality ----


def test_future_tokens_never_change_earlier_logits(tiny_hf_dir, idx):
    model = GPT.from_pretrained(str(tiny_hf_dir))
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert torch.equal(before[:, :15], after[:, :15])
    assert not torch.allclose(before[:, 15:], after[:, 15:])  # the change does reach its own position onwards


def test_loss_ignores_targets_of_minus_one(tiny_hf_dir):
    """With targets, each target's NLL from the full logits, and exactly 0 where the target is -1; 285
    scored targets, so that the head runs in several chunks."""
    model = GPT.from_pretrained(str(tiny_hf_dir))
    idx = torch.randint(0, TINY["vocab_size"], (3, 100), generator=torch.Generator().manual_seed(2))
    targets = idx.roll(-1, dims=1)
    targets[:, :5] = -1
    with torch.no_grad():
        logits, nll = model(idx), model(idx, targets)  # (N, T, V), (N, T)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].flatten(0, 1), targets[:, 5:].flatten(), reduction="none")
    assert nll.shape == targets.shape and torch.equal(nll[:, :5], torch.zeros(3, 5))
    assert torch.allclose(nll[:, 5:].flatten(), expected, atol=1e-5)


def uncached_generate(model: GPT, idx: torch.Tensor, steps: int, top_k: int | None = None) -> torch.Tensor:
    """Generation without a cache: every step runs the whole sequence (its last block_size tokens) again;
    greedy by argmax, else sampled at temperature 1 as GPT.generate samples."""
    for _ in range(steps):
        logits = model(idx[:, -model.config.block_size:])[:, -1]  # (N, vocab)
        if top_k == 1:
            token = logits.argmax(-1, keepdim=True)
        else:
            token = torch.multinomial(torch.softmax(logits, -1), num_samples=1)
        idx = torch.cat([idx, token], dim=1)
    return idx


@pytest.mark.parametrize("top_k", [1, None], ids=["greedy", "sampled"])
def test_cached_generation_gives_the_tokens_of_the_uncached_loop(tmp_path, idx, top_k):
    """20 new tokens after 6 with block_size 16: the cache serves the first 10, then the window moves on."""
    model = GPT.from_pretrained(str(write_hf_checkpoint(tmp_path, n_positions=16)))
    with torch.no_grad():
        torch.manual_seed(3)
        expected = uncached_generate(model, idx[:, :6], 20, top_k)
        torch.manual_seed(3)
        assert torch.equal(model.generate(idx[:, :6], 20, top_k=top_k), expected)


def test_a_cached_step_computes_what_the_whole_sequence_computes(tiny_hf_dir, idx):
    model, cache = GPT.from_pretrained(str(tiny_hf_dir)), [gpt2.KVCache() for _ in range(TINY["n_layer"])]
    with torch.no_grad():
        full = model(idx)  # (N, T, vocab)
        steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, j:j + 1], cache=cache) for j in range(5, idx.shape[1])]
        assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
        assert len(cache[0]) == idx.shape[1]
        with pytest.raises(ValueError, match="one token at a time"):  # the causal mask would be misaligned
            model(idx[:, :2], cache=cache)


# ---- loading errors: one line, naming the key and the shapes ----


def write_state(folder: Path, hf: dict[str, torch.Tensor], config: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf, folder / "model.safetensors")
    if config:
        (folder / "config.json").write_text(json.dumps(hf_gpt2_config(**TINY)))
    return folder


def load_error(exc: type[Exception], name_or_path: str | Path, match: str) -> str:
    with pytest.raises(exc, match=match) as info:
        GPT.from_pretrained(str(name_or_path))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_weight_named_bias_is_not_mistaken_for_the_mask(tmp_path):
    hf = hf_gpt2_state_dict(**TINY)
    del hf["transformer.h.1.attn.c_attn.bias"]  # a weight whose name ends like the mask buffer's
    load_error(ValueError, write_state(tmp_path, hf), r"Missing key.*transformer\.h\.1\.attn\.c_attn\.bias")


def test_unexpected_key(tmp_path):
    hf = hf_gpt2_state_dict(**TINY)
    hf["transformer.h.0.attn.c_attn.lora_A"] = torch.zeros(4, 32)
    load_error(ValueError, write_state(tmp_path, hf), r"Unexpected key.*transformer\.h\.0\.attn\.c_attn\.lora_A")


def test_wrong_shape_names_both_shapes(tmp_path):
    hf = hf_gpt2_state_dict(**TINY)
    hf["transformer.h.0.mlp.c_fc.weight"] = hf["transformer.h.0.mlp.c_fc.weight"].t().contiguous()  # nn.Linear's (out, in)
    load_error(ValueError, write_state(tmp_path, hf), r"transformer\.h\.0\.mlp\.c_fc\.weight.*\[32, 128\].*\[128, 32\]")


def test_config_json_disagreeing_with_the_weights(tmp_path):
    folder = write_hf_checkpoint(tmp_path, n_layer=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    load_error(ValueError, folder, r"Missing key.*transformer\.h\.2\.")


def test_untied_lm_head_is_refused(tmp_path):
    hf = hf_gpt2_state_dict(**TINY)
    hf["lm_head.weight"] = hf["transformer.wte.weight"] + 1.0
    load_error(ValueError, write_state(tmp_path, hf), "lm_head.weight differs from wte.weight")


def test_unknown_n_head_without_config_asks_for_config_json(tmp_path):
    folder = write_hf_checkpoint(tmp_path, with_config=False)
    load_error(ValueError, folder, "n_head of a 2-layer, 32-wide GPT-2.*head size 64.*config.json")


def test_unknown_model_name_lists_the_known_ones():
    load_error(ValueError, "gpt3", r"unknown model 'gpt3'.*gpt2, gpt2-medium, gpt2-large, gpt2-xl.*folder")


@pytest.mark.parametrize("missing", ["nowhere/model.safetensors", "nowhere.safetensors", "nowhere/"])
def test_file_not_found(tmp_path, missing):
    load_error(FileNotFoundError, tmp_path / missing, "not found")


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    load_error(FileNotFoundError, tmp_path, r"model\.safetensors not found")


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    load_error(ValueError, tmp_path, "not a readable safetensors file")


# ---- save_pretrained ----


def test_save_pretrained_round_trip_is_exact(tiny_hf_dir, tmp_path, idx):
    model = GPT.from_pretrained(str(tiny_hf_dir))
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(str(tmp_path / "saved"))(idx), model(idx))


def test_save_pretrained_writes_hugging_face_keys_and_orientation(tiny_hf_dir, tmp_path):
    GPT.from_pretrained(str(tiny_hf_dir)).save_pretrained(tmp_path)
    original = {k: v for k, v in load_file(tiny_hf_dir / "model.safetensors").items() if not k.endswith(".attn.bias")}
    saved = load_file(tmp_path / "model.safetensors")
    assert saved.keys() == original.keys()  # transformer. prefix, no mask buffers, no lm_head
    for key in original:
        assert torch.equal(saved[key], original[key]), key  # Conv1D weights back in (in, out)
    config = json.loads((tmp_path / "config.json").read_text())
    expected = json.loads((tiny_hf_dir / "config.json").read_text())
    for field in ("model_type", "architectures", "activation_function", "n_positions", "n_ctx", "n_embd", "n_head", "n_layer", "vocab_size", "layer_norm_epsilon"):
        assert config[field] == expected[field], field


def test_fresh_model_saved_matches_reference(tmp_path, idx):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=TINY["vocab_size"], n_layer=2, n_head=4, n_embd=32)).eval()
    model.save_pretrained(tmp_path)
    assert max_diff(model, load_file(tmp_path / "model.safetensors"), 4, idx) <= 1e-4


def test_interrupted_save_pretrained_leaves_the_old_file(tiny_hf_dir, tmp_path, monkeypatch):
    out = write_hf_checkpoint(tmp_path / "out", seed=5)
    before = (out / "model.safetensors").read_bytes()

    def killed_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt2, "save_file", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        GPT.from_pretrained(str(tiny_hf_dir)).save_pretrained(out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp file left
