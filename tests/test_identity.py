"""The one identity rule (core/identity.py): exact match or the differing fields named; refuse in the run's own
folder, skip elsewhere."""

import json

import pytest

from pudding.core.errors import ConfigError
from pudding.core.identity import claim_identity, find_reusable, identity_differences, require_identity


def test_identity_differences_names_every_differing_field_and_nothing_else():
    recorded = {"model": {"sha": "a"}, "samples": 16, "barriers": [1, 1], "only_recorded": 1}
    wanted = {"model": {"sha": "a"}, "samples": 128, "barriers": [1, 2], "only_wanted": 2}
    assert identity_differences(recorded, wanted) == ["barriers", "only_recorded", "only_wanted", "samples"]
    assert identity_differences(wanted, dict(wanted)) == []
    assert identity_differences({"model": {"sha": "a", "n": 1}}, {"model": {"sha": "a", "n": 2}}) == ["model"]
    assert identity_differences(None, wanted) and "identity" in identity_differences(None, wanted)[0]


def test_require_identity_refuses_with_the_fields_and_passes_on_an_exact_match():
    require_identity({"a": 1}, {"a": 1}, "x", "y")
    with pytest.raises(ConfigError, match=r"^ckpt was made elsewhere \(differs in: a, b\); delete it$"):
        require_identity({"a": 1}, {"a": 2, "b": 3}, "ckpt was made elsewhere", "delete it")


def test_claim_identity_writes_once_then_holds_every_later_job_to_it(tmp_path):
    path = tmp_path / "run" / "identity.json"
    claim_identity(path, {"docs": [1, 2]}, "run", "pick another")
    assert json.loads(path.read_text()) == {"docs": [1, 2]}
    claim_identity(path, {"docs": [1, 2]}, "run", "pick another")
    with pytest.raises(ConfigError, match=r"differs in: docs"):
        claim_identity(path, {"docs": [1, 3]}, "run", "pick another")
    assert json.loads(path.read_text()) == {"docs": [1, 2]}  # the refused job did not overwrite it


def _artifacts(tmp_path, identities: dict[str, dict | None]):
    for name, identity in identities.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "id.json").write_text("{corrupt" if identity is None else json.dumps(identity))

    def differences(folder):
        text = (folder / "id.json").read_text()
        if text.startswith("{corrupt"):
            raise ConfigError("unreadable")
        return identity_differences(json.loads(text), {"samples": 16})
    return differences


def test_find_reusable_takes_the_first_exact_match_elsewhere_and_skips_the_rest(tmp_path):
    differences = _artifacts(tmp_path, {"other": {"samples": 128}, "broken": None, "same": {"samples": 16}})
    elsewhere = [tmp_path / "other", tmp_path / "broken", tmp_path / "same"]
    assert find_reusable(tmp_path / "own", elsewhere, differences, "pool") == tmp_path / "same"
    assert find_reusable(tmp_path / "own", elsewhere[:2], differences, "pool") is None


def test_find_reusable_refuses_a_mismatched_own_folder_rather_than_overwrite_it(tmp_path):
    differences = _artifacts(tmp_path, {"own": {"samples": 128}, "same": {"samples": 16}})
    with pytest.raises(ConfigError, match=r"own holds a pool made for another configuration \(differs in: samples\)"):
        find_reusable(tmp_path / "own", [tmp_path / "same"], differences, "pool")
    (tmp_path / "own" / "id.json").write_text(json.dumps({"samples": 16}))
    assert find_reusable(tmp_path / "own", [tmp_path / "same"], differences, "pool") == tmp_path / "own"
