import json
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the measurement scripts the tests check
SHARED_MODEL = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories_val.txt"


def make_tiny_llama(path: Path, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, seed=0):
    """A random Llama checkpoint with a byte-level tokenizer copied from the shared model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(SHARED_MODEL).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def shared_model():
    if not (SHARED_MODEL / "config.json").exists():
        pytest.fail(f"the shared model is missing at {SHARED_MODEL}: CI must run with ../shared beside the checkout")
    return SHARED_MODEL


@pytest.fixture(scope="session")
def story_text():
    return TINYSTORIES.read_text()


def load_json(path):
    return json.loads(Path(path).read_text())
