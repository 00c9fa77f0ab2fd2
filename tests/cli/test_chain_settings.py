"""The chain the `c2d` commands use when the environment names one: the C2D_CHAIN_* settings,
read as the Provider reads them (mesh.chain_config), so that both agree on the chain's id."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.chain import current_chain
from mesh import ocean


def test_the_cli_reads_the_chain_settings_as_the_provider_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contracts_file = tmp_path / "contracts.json"
    ocean.Contracts(1337, *(["0x" + "22" * 20] * 5)).save(contracts_file)
    monkeypatch.setenv("C2D_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("C2D_CHAIN_URL", "http://127.0.0.1:8545")
    monkeypatch.setenv("C2D_CHAIN_CONTRACTS", str(contracts_file))
    monkeypatch.delenv("C2D_CHAIN_ID", raising=False)
    with pytest.raises(SystemExit, match="C2D_CHAIN_ID is required"):
        current_chain()

    # The id the environment gives, not the one the contracts file was written on.
    monkeypatch.setenv("C2D_CHAIN_ID", "4242")
    local = current_chain()
    assert local is not None
    assert (local.url, local.chain_id, local.contracts.factory) == (
        "http://127.0.0.1:8545",
        4242,
        "0x" + "22" * 20,
    )
    assert local.env() == {
        "C2D_CHAIN_URL": "http://127.0.0.1:8545",
        "C2D_CHAIN_ID": "4242",
        "C2D_CHAIN_CONTRACTS": str(contracts_file),
    }

    monkeypatch.delenv("C2D_CHAIN_CONTRACTS")
    with pytest.raises(SystemExit, match="C2D_CHAIN_URL needs C2D_CHAIN_CONTRACTS"):
        current_chain()
    monkeypatch.delenv("C2D_CHAIN_URL")
    assert current_chain() is None
