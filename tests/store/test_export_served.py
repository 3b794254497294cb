"""The export is the model the server serves: tied embeddings an adapter unties, and the adapter's own tokenizer.

Issue 28, item 3: a base whose config ties the embeddings but whose file also stores `lm_head.weight` exported an
embedding or head LoRA still tied (the loader re-tied the two, so one side overwrote the other), and the export
wrote the base's tokenizer and chat template while the server serves the adapter's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from server.boot.boot import boot
from server.config.load import load_config
from server.load.adapters import BootError
from server.store.export import export_merged
from tests.conftest import build_adapter, exported_weights, load_as_served, make_added_token_adapter

Writer = Callable[[dict[str, Any]], Path]
TEXT = "Arr matey, the capital of France is Paris."


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


@pytest.fixture
def stored_head_base(tiny_base: Path, tmp_path: Path) -> Path:
    """The tiny base (tie_word_embeddings: true) with `lm_head.weight` stored beside the embedding, as some
    checkpoints ship it: the loader ties the two, so the stored head is read from the embedding."""
    base = tmp_path / "stored-head"
    shutil.copytree(tiny_base, base)
    tensors = load_file(str(base / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_embedding_or_head_lora_on_a_stored_tied_head_exports_untied(
    target: str, stored_head_base: Path, write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    adapter = build_adapter(stored_head_base, tmp_path / target, seed=5, targets=[target, "q_proj"])
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    # PEFT also saves the (tied) base matrix of a targeted embedding; keep only the LoRA tensors, as training gives.
    save_file({k: v for k, v in stored.items() if ".lora_" in k}, str(adapter / "adapter_model.safetensors"))
    tiny_config_data["model"]["path"] = str(stored_head_base)
    tiny_config_data["adapters"] = [{"name": target, "path": str(adapter)}]
    tiny_config_data["cache"] = {"enabled": False}
    config = load_config(write_config(tiny_config_data))
    out = tmp_path / "out"
    export_merged(config, out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    served = boot(config)
    state = served.model.state_dict()
    written = exported_weights(out)
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]), "served still tied"
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(written[key], state[key]), key
    ids = torch.tensor([served.tokenize(TEXT)])
    assert torch.equal(_logits(load_as_served(out, served), ids), _logits(served.model, ids))
    served.close()


def _chat(tokenizer: Any) -> str:
    messages = [{"role": "user", "content": "Ahoy <ship>?"}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


@pytest.mark.parametrize("shipped", ["added_tokens", "chat_template"])
def test_export_writes_the_adapters_tokenizer_and_chat_template(
    shipped: str, tiny_base: Path, write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    """An adapter that ships its tokenizer (two added tokens, or only its own chat template) is served with it; the
    export must carry the same tokenizer, or a reloaded checkpoint has fewer tokens than rows and another template."""
    if shipped == "added_tokens":
        adapter = make_added_token_adapter(tiny_base, tmp_path / "added")
    else:
        adapter = build_adapter(tiny_base, tmp_path / "templated", seed=3)
        tok = AutoTokenizer.from_pretrained(tiny_base)
        tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
        tok.save_pretrained(adapter)
    tiny_config_data["adapters"] = [{"name": "tokens", "path": str(adapter)}]
    tiny_config_data["cache"] = {"enabled": False}
    config = load_config(write_config(tiny_config_data))
    out = tmp_path / "out"
    export_merged(config, out)

    served = boot(config)
    exported_tok = AutoTokenizer.from_pretrained(out)
    assert exported_tok.chat_template == served.tokenizer.chat_template is not None
    assert exported_tok.get_vocab() == served.tokenizer.get_vocab()
    text = _chat(served.tokenizer)
    assert _chat(exported_tok) == text
    ids = torch.tensor([served.tokenize(text)])
    assert exported_tok(text).input_ids == ids[0].tolist()
    if shipped == "added_tokens":
        assert ids.max().item() >= len(AutoTokenizer.from_pretrained(tiny_base))  # the added tokens are in the prompt
    state = served.model.state_dict()
    for key, value in exported_weights(out).items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(_logits(load_as_served(out, served), ids), _logits(served.model, ids))
    served.close()


def test_export_refuses_added_tokens_no_adapter_ships_rows_for(
    tiny_base: Path, write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    """Boot refuses an added-token tokenizer whose embedding rows no adapter ships; so does the export."""
    adapter = make_added_token_adapter(tiny_base, tmp_path / "rowless", ship_rows=False)
    tiny_config_data["adapters"] = [{"name": "tokens", "path": str(adapter)}]
    config = load_config(write_config(tiny_config_data))
    with pytest.raises(BootError, match="adds tokens, but no adapter ships their rows"):
        export_merged(config, tmp_path / "out")
    with pytest.raises(BootError, match="adds tokens, but no adapter ships their rows"):
        boot(config)
    assert not (tmp_path / "out").exists()
