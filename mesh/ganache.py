"""A local ganache node on 127.0.0.1 (for `c2d chain up` and for tests), and the ganache-only
calls that rewind and advance its chain (snapshot, revert, mine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import structlog
from web3 import AsyncWeb3
from web3.types import RPCEndpoint

from mesh.chain import rpc

log = structlog.get_logger(__name__)

_ROOT = Path(__file__).resolve().parents[1]
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 5.0
_CALL_TIMEOUT_S = 10.0
# Ports taken by something else between our probe and ganache's bind: try a few others.
_PORT_ATTEMPTS = 5


class GanacheError(RuntimeError):
    """ganache is missing, or did not start."""


def find_ganache() -> Path | None:
    """node_modules/.bin/ganache of this repository (installed by `npm install`), else the
    first ganache on PATH."""
    local = _ROOT / "node_modules" / ".bin" / "ganache"
    if local.exists():
        return local
    found = shutil.which("ganache")
    return Path(found) if found else None


@dataclass
class Ganache:
    """A running ganache node; `stop` ends it."""

    url: str
    chain_id: int
    process: subprocess.Popen[bytes]
    # The log file ganache writes to while it runs, closed by `stop`.
    log_handle: BinaryIO | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int:
        """Returns ganache's exit status once it has ended (by itself or by `stop`)."""
        return await _exit_status(self.process)

    async def stop(self) -> None:
        """Ends the node (SIGTERM, then SIGKILL after a few seconds); idempotent."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(_exit_status(self.process), _STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await _exit_status(self.process)
            log.info("ganache.stopped", url=self.url, pid=self.pid)
        if self.log_handle is not None:
            self.log_handle.close()
            self.log_handle = None


async def _exit_status(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is not None:
        return process.returncode
    # A pidfd turns readable when the process ends: no polling, no thread, and any event loop
    # can watch it. The process is not reaped until the wait() below, so its pid cannot have
    # been reused by then.
    pidfd = os.pidfd_open(process.pid)
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, ended.set)
    try:
        await ended.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return process.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _ending_with_us(command: list[str]) -> list[str]:
    """`command` under setpriv --pdeathsig: the kernel sends the node SIGTERM when the process
    that started it dies, even by SIGKILL or a closed pipe, so no node outlives its command or
    test run. setpriv execs the node: its pid stays the node's."""
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    return [setpriv, "--pdeathsig=SIGTERM", "--", *command] if setpriv else command


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As ganache binds: connections of a node stopped a moment ago (TIME_WAIT) do not make
        # the port taken, a socket listening there does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _arguments(
    *,
    port: int,
    accounts: Sequence[tuple[bytes, int]],
    chain_id: int,
    db: Path | None,
    block_time: float | None,
) -> list[str]:
    args = [
        "--server.host=127.0.0.1",
        f"--server.port={port}",
        "--server.ws=false",
        f"--chain.chainId={chain_id}",
        # net_version: the chain id too, rather than ganache's start time.
        f"--chain.networkId={chain_id}",
        # The newest fork ganache knows; Ocean's 0.8 contracts need nothing newer.
        "--chain.hardfork=shanghai",
        # Ocean's templates and BPool are close to the 24 KiB code limit, and deploying them
        # takes up to ~5.3M gas: the default 30M block limit fits them, said out loud so a
        # change of default does not surprise.
        "--miner.blockGasLimit=30000000",
        "--logging.quiet",
    ]
    if accounts:
        args += [f"--wallet.accounts=0x{key.hex()},{wei}" for key, wei in accounts]
    else:
        # No unknown keys funded: the caller decides who holds ETH.
        args.append("--wallet.totalAccounts=0")
    if db is not None:
        args.append(f"--database.dbPath={db}")
    if block_time is not None:
        args.append(f"--miner.blockTime={block_time:g}")
    return args


async def _chain_id(url: str, timeout_s: float) -> int | None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.post(url, json=body) as response,
        ):
            answer = await response.json(content_type=None)
            return int(answer["result"], 16)
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
        return None


def _tail(path: Path, lines: int = 12, width: int = 300) -> str:
    """The last lines of a log, each cut to `width`: node prints whole minified sources with
    its stack traces."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(line[:width] for line in text.strip().splitlines()[-lines:])


async def start(
    *,
    port: int = 0,
    accounts: Sequence[tuple[bytes, int]] = (),
    chain_id: int = 1337,
    db: Path | None = None,
    block_time: float | None = None,
    log_file: Path | None = None,
) -> Ganache:
    """Starts ganache on 127.0.0.1:`port` (0: a free port) with `accounts` (private key, wei)
    funded, and returns once it answers eth_chainId. With `db` the chain persists there; with
    `block_time` blocks come every so many seconds instead of one per transaction."""
    binary = find_ganache()
    if binary is None:
        raise GanacheError(
            "ganache is not installed: run `npm install` in the repository root "
            "(it installs node_modules/.bin/ganache)"
        )
    attempts = 1 if port else _PORT_ATTEMPTS
    last_error: GanacheError | None = None
    for _ in range(attempts):
        try:
            return await _start_once(
                binary,
                port=port or _free_port(),
                accounts=accounts,
                chain_id=chain_id,
                db=db,
                block_time=block_time,
                log_file=log_file,
            )
        except _PortTaken as error:
            last_error = GanacheError(str(error))
    assert last_error is not None
    raise last_error


class _PortTaken(GanacheError):
    pass


def _open_log(log_file: Path | None, db: Path | None) -> tuple[Path, BinaryIO]:
    """The file ganache writes to (a temporary one unless `log_file`), open for appending;
    creates the folders it and the database need."""
    if db is not None:
        db.mkdir(parents=True, exist_ok=True)
    if log_file is None:
        descriptor, name = tempfile.mkstemp(prefix="c2d-ganache-", suffix=".log")
        return Path(name), os.fdopen(descriptor, "ab")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    return log_file, log_file.open("ab")


async def _start_once(
    binary: Path,
    *,
    port: int,
    accounts: Sequence[tuple[bytes, int]],
    chain_id: int,
    db: Path | None,
    block_time: float | None,
    log_file: Path | None,
) -> Ganache:
    url = f"http://127.0.0.1:{port}"
    if not _port_free(port):
        # Checked first, or a node already there would answer in place of ours.
        raise _PortTaken(f"127.0.0.1:{port} is taken")
    own_log = log_file is None
    log_path, handle = _open_log(log_file, db)
    arguments = _arguments(
        port=port, accounts=accounts, chain_id=chain_id, db=db, block_time=block_time
    )
    # Started directly (not through npx) so that the pid is the node's own and stopping it
    # leaves nothing behind. A plain Popen, not an asyncio subprocess: the node may outlive
    # the event loop that started it (a test session's fixture, a CLI's short loops). Its own
    # session keeps a terminal's ^C with the parent, which stops it in order.
    process = subprocess.Popen(  # noqa: ASYNC220 (see above)
        _ending_with_us([str(binary), *arguments]),
        stdin=subprocess.DEVNULL,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    node = Ganache(url=url, chain_id=chain_id, process=process, log_handle=handle)
    deadline = time.monotonic() + _START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                tail = _tail(log_path)
                if "EADDRINUSE" in tail:
                    raise _PortTaken(f"port {port} is taken")
                raise GanacheError(
                    f"ganache exited with status {process.returncode} while starting:\n{tail}"
                )
            answered = await _chain_id(url, timeout_s=1.0)
            if answered is not None:
                if answered != chain_id:
                    raise GanacheError(
                        f"{url} answers chain id {answered}, not {chain_id}: "
                        "is another node on that port?"
                    )
                break
            if time.monotonic() > deadline:
                raise GanacheError(
                    f"ganache did not answer on {url} within {_START_TIMEOUT_S:g} s:\n"
                    + _tail(log_path)
                )
            await asyncio.sleep(0.05)
    except BaseException:
        await node.stop()
        if own_log:
            log_path.unlink(missing_ok=True)
        raise
    if own_log:
        # The log only matters while starting: a node that is up has said what it had to.
        log_path.unlink(missing_ok=True)
    log.info("ganache.started", url=url, pid=process.pid, chain_id=chain_id)
    return node


async def _call(w3: AsyncWeb3[Any], method: str, params: list[Any]) -> Any:
    response = await rpc(
        w3.provider.make_request(RPCEndpoint(method), params),
        timeout_s=_CALL_TIMEOUT_S,
        what=method,
    )
    if "error" in response:
        raise GanacheError(f"{method} failed: {json.dumps(response['error'])}")
    return response["result"]


async def snapshot(w3: AsyncWeb3[Any]) -> str:
    """Marks the chain's current state (evm_snapshot); `revert` goes back to it."""
    return str(await _call(w3, "evm_snapshot", []))


async def revert(w3: AsyncWeb3[Any], snapshot_id: str) -> bool:
    """Drops every block after `snapshot_id` (evm_revert), as a chain reorganisation would;
    the snapshot is used up."""
    return bool(await _call(w3, "evm_revert", [snapshot_id]))


async def mine(w3: AsyncWeb3[Any], blocks: int = 1) -> None:
    """Mines `blocks` empty blocks (evm_mine)."""
    if blocks == 1:
        await _call(w3, "evm_mine", [])
    elif blocks > 1:
        await _call(w3, "evm_mine", [{"blocks": blocks}])
