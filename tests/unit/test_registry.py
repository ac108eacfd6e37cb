"""The worker registry: file and environment forms, and the errors a mistyped one gets."""

from __future__ import annotations

import pytest

from coolfusion.orchestrator.registry import RegistryError, load_registry, parse_registry, registry_strategy


def test_file_and_environment_entries_are_combined_in_order(tmp_path):
    path = tmp_path / "workers.yaml"
    path.write_text("workers:\n  - name: smollm2\n    address: 127.0.0.1:50051\n")
    entries = load_registry(path, "gemma3=127.0.0.1:50052")
    assert [(e.name, e.address) for e in entries] == [("smollm2", "127.0.0.1:50051"), ("gemma3", "127.0.0.1:50052")]


def test_json_registry_is_read(tmp_path):
    path = tmp_path / "workers.json"
    path.write_text('{"workers": [{"name": "a", "address": "h:1"}]}')
    assert load_registry(path)[0].name == "a"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "top-level 'workers' list"),
        ({"workers": [{"name": "a"}]}, "needs a name and an address"),
        ({"workers": [{"name": "Bad_Name", "address": "h:1"}]}, "lowercase"),
        ({"workers": [{"name": "a", "address": "h:1"}, {"name": "a", "address": "h:2"}]}, "duplicate worker names: a"),
        ({"workers": [{"name": "a", "address": "h:1", "tls": "yes"}]}, "tls must be a mapping"),
        ({"workers": [{"name": "a", "address": "h:1", "weight": 0}]}, "weight is 0; it must be a positive number"),
        ({"workers": [{"name": "a", "address": "h:1", "weight": "2"}]}, "weight is '2'"),
        ({"workers": [{"name": "a", "address": "h:1", "prompt_template": "Q:"}]}, "containing {prompt}"),
    ],
)
def test_malformed_registries_say_what_is_wrong(document, message):
    with pytest.raises(RegistryError, match=message):
        parse_registry(document)


def test_duplicates_across_file_and_environment_are_refused(tmp_path):
    path = tmp_path / "workers.yaml"
    path.write_text("workers:\n  - {name: a, address: 'h:1'}\n")
    with pytest.raises(RegistryError, match="duplicate worker names: a"):
        load_registry(path, "a=h:2")


def test_malformed_environment_and_empty_registry_are_refused():
    with pytest.raises(RegistryError, match="name=host:port"):
        load_registry(None, "just-an-address:1")
    with pytest.raises(RegistryError, match="no workers registered"):
        load_registry(None, None)


def test_missing_tls_or_token_files_fail_at_load_time(tmp_path):
    path = tmp_path / "workers.yaml"
    path.write_text(
        "workers:\n  - name: a\n    address: h:1\n    tls: {ca_file: /nonexistent/ca.crt}\n"
        "  - name: b\n    address: h:2\n    token_file: /nonexistent/token\n"
    )
    with pytest.raises(RegistryError, match="worker a: tls.ca_file /nonexistent/ca.crt is missing"):
        load_registry(path)
    path.write_text("workers:\n  - name: b\n    address: h:2\n    token_file: /nonexistent/token\n")
    with pytest.raises(RegistryError, match="worker b: token_file /nonexistent/token"):
        load_registry(path)


def test_weights_and_templates_become_fusion_defaults():
    entries = parse_registry({"workers": [
        {"name": "chat", "address": "h:1", "weight": 2, "prompt_template": "{prompt}\n\n"},
        {"name": "base", "address": "h:2"},
    ]})  # fmt: skip
    defaults = registry_strategy(entries)
    assert defaults.weights == {"chat": 2.0} and defaults.prompt_templates == {"chat": "{prompt}\n\n"}
