"""A user's LightningModule wrapping a tiny Hugging Face causal language model, through the callback.

The module is written the way Hugging Face users write one: dict batches of ``input_ids``,
``attention_mask`` and ``labels``, the loss the model computes itself, ``self.model`` the
``LlamaForCausalLM``. The callback prunes its ``Linear`` layers, fine-tunes masked, exports and
verifies; the exported network must match the masked one on batches of other sizes, have lost
attention heads, and rebuild from the checkpoint.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader
from user_modules import VOCAB, CausalLM, Sentences, quiet_trainer

from lightning_prune import PruneExportCallback, load_pruned, verify_equivalence
from lightning_prune.core.verify.report import count_params

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("pruner", [pytest.param("auto", id="ours"), pytest.param("nni-l1", id="nni-l1")])
def test_causal_lm_through_the_callback(tmp_path, pruner: str) -> None:
    """prune -> masked fine-tune -> export -> verify -> save on a Hugging Face model, with no hand edits;
    NNI's per-row masks on the Linear layers go through the same head-aware group ranking."""
    if pruner.startswith("nni-"):
        pytest.importorskip("nni")
    L.seed_everything(0, verbose=False)
    module = CausalLM(tie=False)  # the LM head its own tensor; tied heads: test_recipes_callback.py
    callback = PruneExportCallback(pruner=pruner, op_types=["Linear"], export_dir=str(tmp_path / "out"))
    trainer = quiet_trainer(L, tmp_path, [callback], max_steps=4, limit_val_batches=2)
    trainer.fit(
        module, DataLoader(Sentences(32, 8, seed=0), batch_size=8), DataLoader(Sentences(16, 8, seed=1), batch_size=8)
    )
    network = callback.exported_network
    assert isinstance(network, transformers.LlamaForCausalLM)
    report = callback.report
    assert report["max_relative_error"] <= 1e-5 and report["verified_batches"] >= 1
    other = {"input_ids": torch.randint(0, VOCAB, (3, 13)), "attention_mask": torch.ones(3, 13, dtype=torch.long)}
    assert verify_equivalence(module.model, network, other, rtol=1e-5).passed  # another batch size and length
    assert count_params(network) < count_params(module.model)
    assert any("head(s) removed" in note for note in report["notes"]), report["notes"]
    rebuilt = load_pruned(report["path"], CausalLM(tie=False)).model.eval()
    assert verify_equivalence(network, rebuilt, other, rtol=1e-5).passed
    network.save_pretrained(tmp_path / "hf")  # uniform ranking: every layer keeps the same widths
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.num_attention_heads < module.model.config.num_attention_heads
    assert verify_equivalence(network, reloaded, other, rtol=1e-5).passed


def test_causal_lm_residual_width_through_the_callback(tmp_path) -> None:
    """`op_types` naming "Embedding" as well prunes the residual width (the embedding's columns with every
    projection that writes the stream); the exported model generates what the masked one does."""
    L.seed_everything(0, verbose=False)
    module = CausalLM()
    callback = PruneExportCallback(
        pruner="l1", sparsity=0.5, op_types=["Linear", "Embedding"], export_dir=str(tmp_path / "out")
    )
    trainer = quiet_trainer(L, tmp_path, [callback], max_steps=2, limit_val_batches=1)
    trainer.fit(
        module, DataLoader(Sentences(16, 8, seed=0), batch_size=8), DataLoader(Sentences(8, 8, seed=1), batch_size=8)
    )
    network = callback.exported_network
    assert network.get_input_embeddings().weight.shape[1] < module.model.config.hidden_size
    assert network.lm_head.in_features == network.get_input_embeddings().weight.shape[1]
    other = {"input_ids": torch.randint(0, VOCAB, (3, 13)), "attention_mask": torch.ones(3, 13, dtype=torch.long)}
    assert verify_equivalence(module.model, network, other, rtol=1e-5).passed
    prompt = {"input_ids": torch.randint(0, VOCAB, (2, 4)), "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(network.generate(**prompt), module.model.generate(**prompt))
