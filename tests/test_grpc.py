"""The real deployment over gRPC on 127.0.0.1.

Servers and device agents run as real processes where a test kills them (the server
SIGKILLed and restarted, a device killed mid-round) or exercises the command line (the TLS
server); elsewhere a :class:`LocalServer` (the coordinator and its gRPC server) and device
agents run as threads of this process: the same protocol over a real loopback socket, and
the programs the session has already compiled. Processes share the session's persistent
JAX compilation cache (conftest.py) and are killed (by pid) in teardown.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import jax
import numpy as np
import pytest

from fedspine_jax import checkpoint
from fedspine_jax.config import load_config
from fedspine_jax.federation import Federation
from fedspine_jax.models.state import flatten
from fedspine_jax.server import auth, wire
from fedspine_jax.server import fedspine_pb2 as pb
from fedspine_jax.server import fedspine_pb2_grpc as pb_grpc
from fedspine_jax.server.wire import config_digest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
N = 3  # tiny.yaml's devices


# ---------------------------------------------------------------------------------------
# processes


class Proc:
    """A child process whose stdout+stderr go to a log file we can wait on."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path):
        self.name = name
        self.log = logdir / f"{name}.log"
        self._f = open(self.log, "ab")
        self.p = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT, env=env,
                                  cwd=REPO)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float, start: int = 0, poll: float = 0.2
                 ) -> re.Match:
        """The first match of ``pattern`` in the log (after offset ``start``)."""
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text(), start)
            if m:
                return m
            if self.p.poll() is not None:
                m = rx.search(self.text(), start)
                if m:
                    return m
                raise AssertionError(f"{self.name} exited ({self.p.returncode}) before "
                                     f"{pattern!r}:\n{self.text()[-3000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"{self.name}: no {pattern!r} within {timeout} s:\n"
                                     f"{self.text()[-3000:]}")
            time.sleep(poll)

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout} s:\n"
                                 f"{self.text()[-3000:]}") from None

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(30)
        self._f.close()


@pytest.fixture(scope="module")
def env() -> dict:
    """The child processes' environment: CPU, unbuffered, and the session's JAX compilation
    cache (conftest.py), which they share with this process and with each other."""
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR"), "conftest.py sets the shared cache"
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return e


@pytest.fixture(scope="module")
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokens")
    auth.write_tokens(d, N)
    return d


# The runs that test recovery skip the end-of-run ONNX export (about 12 s each); the
# three-device run and the fetch test cover it.
NO_EXPORT = ["export.at_end=false"]


def _sets(shared_data: Path, extra=()) -> list[str]:
    return ["federation.simulated_clock=true", f"data.source={shared_data / 'sst2'}",
            *extra]


def _set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _fedspine(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedspine_jax.cli", *args]


def start_server(procs, env, logdir, name, sets, tokens, out, listen="127.0.0.1:0",
                 extra=()) -> tuple[Proc, int]:
    p = Proc(name, _fedspine("server", str(TINY), *_set_args(sets), "--listen", listen,
                             "--tokens", str(tokens), "--out", str(out), "--linger-s", "5",
                             *extra), env, logdir)
    procs.append(p)
    port = int(p.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 240).group(1))
    return p, port


def start_device(procs, env, logdir, i, port, sets, tokens_dir, name=None) -> Proc:
    p = Proc(name or f"device{i}", _fedspine(
        "device", "--server", f"127.0.0.1:{port}", "--device-id", str(i), "--token-file",
        str(tokens_dir / f"device_{i}.token"), "--config", str(TINY), *_set_args(sets)),
        env, logdir)
    procs.append(p)
    return p


def summaries(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    got = [r for r in rows if r.get("summary")]
    by_round = {r["round"]: r for r in got}
    assert len(by_round) == len(got), f"a round was logged twice: {[r['round'] for r in got]}"
    return by_round


def device_rows(out: Path) -> dict[tuple[int, int], dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return {(r["round"], r["device"]): r for r in rows if not r.get("summary")}


def final_state(out: Path, cfg):
    return checkpoint.restore(out / "checkpoints", Federation(cfg, cfg.federation.num_devices))


def assert_same_final_state(out: Path, ref: Path, cfg, atol: float = 1e-6) -> None:
    (s1, x1, k1), (s2, x2, k2) = final_state(out, cfg), final_state(ref, cfg)
    assert k1 == k2 == cfg.federation.rounds and s1.round == s2.round
    assert s1.updates == () and s2.updates == ()
    for name, a, b in (("lora", s1.lora, s2.lora), ("head", s1.head, s2.head)):
        assert jax.tree.structure(a) == jax.tree.structure(b), name
        for k, v in flatten(a).items():
            np.testing.assert_allclose(v, flatten(b)[k], rtol=0, atol=atol,
                                       err_msg=f"{name} {k}")
    np.testing.assert_allclose(s1.last_p, s2.last_p, rtol=0, atol=atol)
    for f in dataclasses.fields(s1.bandit):
        if f.name != "params":
            np.testing.assert_allclose(np.asarray(getattr(s1.bandit, f.name)),
                                       np.asarray(getattr(s2.bandit, f.name)), rtol=0,
                                       atol=atol, err_msg=f"bandit {f.name}")
    for f in dataclasses.fields(s1.devices):  # every device's record
        a, b = getattr(s1.devices, f.name), getattr(s2.devices, f.name)
        if f.name.endswith("importance"):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f.name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=f.name)
    np.testing.assert_allclose(float(x1["clock"]), float(x2["clock"]), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# the in-process simulator's run (the reference) and in-process servers and agents


@pytest.fixture(scope="module")
def reference(tiny_run) -> Path:
    """``fedspine simulate`` of the tiny config (conftest's session run)."""
    return tiny_run[0]


class LocalServer:
    """A coordinator and its gRPC server in this process, closing rounds in a thread."""

    def __init__(self, cfg, out: Path, tokens_dir: Path, linger_s: float = 2.0):
        from fedspine_jax.server.coordinator import Coordinator
        from fedspine_jax.server.servicer import make_server

        self.coord = Coordinator(cfg, out)
        self.server, self.port = make_server(self.coord,
                                             auth.Tokens.load(tokens_dir / "tokens.json"),
                                             "127.0.0.1:0")
        self.stop, self.summary = threading.Event(), []
        self.thread = threading.Thread(
            target=lambda: self.summary.append(self.coord.run(self.stop, linger_s)),
            daemon=True)
        self.thread.start()

    def wait(self, timeout: float) -> dict:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not end within {timeout} s"
        assert self.summary and self.summary[0] is not None
        return self.summary[0]

    def close(self) -> None:
        self.stop.set()
        self.server.stop(0)


class Agents:
    """Device agents (``DeviceAgent.run``) as threads of this process. ``hold`` maps a
    device id to a round its agent waits for ``release`` before training (a device frozen
    mid-round, without a process to SIGSTOP)."""

    def __init__(self):
        self.threads: dict[str, threading.Thread] = {}
        self.results: dict[str, object] = {}
        self.agents: dict[str, object] = {}
        self.release = threading.Event()

    def start(self, cfg, i: int, port: int, tokens_dir: Path, name: str | None = None,
              hold_round: int | None = None):
        from fedspine_jax.device_runtime.agent import Backoff, DeviceAgent

        name = name or f"device{i}"
        agent = DeviceAgent(cfg, i, f"127.0.0.1:{port}", token(tokens_dir, i),
                            backoff=Backoff(base_s=0.2, max_s=2.0, give_up_s=240), wait_s=5)
        if hold_round is not None:
            real = agent.run_round

            def held(header, tensors, download_s):
                if int(header.round) == hold_round:
                    assert self.release.wait(300), "never released"
                return real(header, tensors, download_s)

            agent.run_round = held

        def target():
            try:
                self.results[name] = agent.run()
            except BaseException as e:  # reported by wait()
                self.results[name] = e

        self.agents[name] = agent
        self.threads[name] = threading.Thread(target=target, name=name, daemon=True)
        self.threads[name].start()
        return agent

    def wait(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for name, t in self.threads.items():
            t.join(max(0.0, end - time.monotonic()))
            assert not t.is_alive(), f"{name} still running after {timeout} s"
            assert self.results[name] == 0, f"{name}: {self.results[name]!r}"


def wait_for_round(out: Path, t: int, timeout: float) -> dict:
    """The metrics row of round ``t`` once the server has closed it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (out / "metrics.jsonl").exists():
            rows = summaries(out)
            if t in rows:
                return rows[t]
        time.sleep(0.1)
    raise AssertionError(f"round {t} not closed within {timeout} s")


# ---------------------------------------------------------------------------------------
# a hand-driven client (the refusal and TLS tests)


class Client:
    def __init__(self, port: int, token: str | None, creds=None, server_name=None,
                 max_message_bytes: int = wire.MESSAGE_LIMIT_BYTES):
        opts = wire.channel_options(max_message_bytes)
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        target = f"127.0.0.1:{port}"
        self.ch = (grpc.secure_channel(target, creds, options=opts) if creds is not None
                   else grpc.insecure_channel(target, options=opts))
        self.stub = pb_grpc.FederationStub(self.ch)
        self.md = auth.bearer(token) if token else ()

    def register(self, device_id: int, digest: str):
        return self.stub.Register(pb.RegisterRequest(device_id=device_id, config_digest=digest),
                                  metadata=self.md, timeout=30)

    def fetch(self, device_id: int, wait_s: float = 0.0):
        frames = list(self.stub.FetchTask(pb.FetchTaskRequest(device_id=device_id,
                                                              wait_s=wait_s),
                                          metadata=self.md, timeout=60))
        return frames[0].header, wire.assemble([f.chunk for f in frames[1:]], 1 << 40)

    def upload(self, frames):
        return self.stub.UploadUpdate(iter(frames), metadata=self.md, timeout=60)


def stand_in_update(device_id: int, header, tensors: dict, nan: bool = False,
                    loss_after: float = 0.6, **changes) -> list:
    """A well-formed update made of the task's own tensors (no training)."""
    t = dict(tensors)
    for name in wire.IMPORTANCE:   # a device always reports the importance it measured
        t.setdefault(name, np.zeros_like(t[name.replace("importance", "masks")]))
    t.update(changes)
    if nan:
        k = next(k for k in sorted(t) if k.endswith("lora_b"))
        t[k] = t[k].copy()
        t[k].flat[0] = np.nan
    frames = [pb.UpdateFrame(header=pb.UpdateHeader(device_id=device_id, round=header.round,
                                                    num_tensors=len(t)))]
    frames += [pb.UpdateFrame(chunk=c) for c in wire.dict_chunks(t)]
    frames.append(pb.UpdateFrame(stats=pb.UpdateStats(
        num_samples=50, loss_before=0.7, loss_after=loss_after, lora_importance=1.0,
        ratio=0.0, compute_time_s=1.0, comm_time_s=0.1, flops=1e9)))
    return frames


def _openssl_cert(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return crt, key


def _cryptography_cert(d: Path, name: str) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(k.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256()))
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return crt, key


def self_signed(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (cryptography, else openssl)."""
    try:
        import cryptography  # noqa: F401
        return _cryptography_cert(d, name)
    except ImportError:
        pass
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available")
    return _openssl_cert(d, name)


@pytest.fixture(scope="module")
def tls_server(procs, env, tmp_path_factory, tokens_dir, shared_data):
    """A server with mutual TLS on a free port (tiny config, no devices); its rounds close
    at a quorum of 2 of the 3 devices."""
    d = tmp_path_factory.mktemp("tls")
    srv_crt, srv_key = self_signed(d, "server")
    cli_crt, cli_key = self_signed(d, "device")
    sets = _sets(shared_data, ["federation.quorum=0.6"])
    proc, port = start_server(procs, env, d, "tls-server", sets, tokens_dir / "tokens.json",
                              d / "run", extra=("--tls-cert", str(srv_crt), "--tls-key",
                                                str(srv_key), "--tls-client-ca", str(cli_crt)))
    creds = auth.channel_credentials(srv_crt, cli_crt, cli_key)
    cfg = load_config(TINY, sets)
    return {"port": port, "creds": creds, "proc": proc, "out": d / "run", "dir": d,
            "digest": config_digest(cfg), "server_crt": srv_crt}


def token(tokens_dir: Path, i: int) -> str:
    return auth.read_token(tokens_dir / f"device_{i}.token")


# ---------------------------------------------------------------------------------------
# tests


def test_the_device_agent_imports_the_core_and_the_protocol_only():
    """The device agent imports neither the simulator nor the coordinator (or the servicer,
    or the report): the core and the shared protocol module (wire, auth, generated code)."""
    code = ("import sys; import fedspine_jax.device_runtime.agent; "
            "print(sorted(m for m in sys.modules if m.startswith('fedspine_jax.') and "
            "m.rsplit('.', 1)[-1] in ('simulation', 'coordinator', 'servicer', 'report')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_generated_modules_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from fedspine_jax.server import codegen

    for path in codegen.generate(tmp_path):
        assert codegen.same_code(path.read_text(), (codegen.HERE / path.name).read_text()), (
            f"{path.name} is stale: run python -m fedspine_jax.server.codegen")


def test_generated_modules_compare_without_the_tools_version_stamps():
    from fedspine_jax.server import codegen

    grpc_mod = (codegen.HERE / "fedspine_pb2_grpc.py").read_text()
    pb2 = (codegen.HERE / "fedspine_pb2.py").read_text()
    newer = grpc_mod.replace("GRPC_GENERATED_VERSION = '", "GRPC_GENERATED_VERSION = '9")
    assert newer != grpc_mod and codegen.same_code(newer, grpc_mod)
    bumped = re.sub(r"(Domain\.PUBLIC,\s*)\d+", r"\g<1>99", pb2)
    assert bumped != pb2 and codegen.same_code(bumped, pb2)
    # a change of the code itself is still a difference
    assert not codegen.same_code(grpc_mod.replace("def ", "def x", 1), grpc_mod)


def test_wire_round_trip_and_limits():
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(300, 7)).astype(np.float32),
               "b": rng.integers(0, 9, (3, 4, 5)).astype(np.int64),
               "m": rng.random((6, 12)) > 0.5, "e": np.zeros((0, 4), np.float16)}
    chunks = list(wire.dict_chunks(tensors, chunk_bytes=1000))
    assert sum(c.HasField("header") for c in chunks) == len(tensors)
    assert max(len(c.data) for c in chunks) <= 1000
    back = wire.assemble(chunks, sum(v.nbytes for v in tensors.values()))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    with pytest.raises(wire.TooLarge, match="over the limit"):
        wire.assemble(chunks, sum(v.nbytes for v in tensors.values()) - 1)
    with pytest.raises(wire.WireError, match="sent twice"):
        wire.assemble(chunks + chunks[:1], 1 << 30)
    m = next(c for c in chunks if c.header.name == "m")  # one chunk holds all of it
    with pytest.raises(wire.WireError, match="beyond the end of tensor m"):
        wire.assemble([m, pb.TensorChunk(data=b"\x01")], 1 << 30)
    first = chunks[0]  # a chunk of "a" carrying more than its shape holds
    with pytest.raises(wire.WireError, match="more bytes than its shape"):
        wire.assemble([pb.TensorChunk(header=first.header, data=bytes(300 * 7 * 4 + 4))],
                      1 << 30)
    with pytest.raises(wire.WireError, match="cut short"):
        wire.assemble([first], 1 << 30)


def test_tls_and_tokens(tls_server, tokens_dir):
    port, creds, digest = tls_server["port"], tls_server["creds"], tls_server["digest"]
    ok = Client(port, token(tokens_dir, 0), creds)
    reply = ok.register(0, digest)
    assert (reply.num_devices, reply.rounds, reply.current_round) == (N, 3, 1)

    def code_of(fn):
        with pytest.raises(grpc.RpcError) as e:
            fn()
        return e.value.code(), e.value.details() or ""

    # plaintext to a TLS port, and TLS without the client certificate mTLS requires
    assert code_of(lambda: Client(port, token(tokens_dir, 0)).register(0, digest))[0] == \
        grpc.StatusCode.UNAVAILABLE
    no_cert = auth.channel_credentials(tls_server["server_crt"])
    assert code_of(lambda: Client(port, token(tokens_dir, 0), no_cert).register(0, digest)
                   )[0] == grpc.StatusCode.UNAVAILABLE
    # tokens: missing, unknown, another device's
    code, msg = code_of(lambda: Client(port, None, creds).register(0, digest))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing" in msg
    code, msg = code_of(lambda: Client(port, "x" * 43, creds).register(0, digest))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown" in msg
    code, msg = code_of(lambda: Client(port, "x" * 43, creds).fetch(0))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, msg = code_of(lambda: Client(port, token(tokens_dir, 1), creds).register(0, digest))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "device 1" in msg
    # a device on another config
    code, msg = code_of(lambda: Client(port, token(tokens_dir, 2), creds).register(2, "0" * 64))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "different config" in msg


def test_bad_updates_refused_state_unchanged(tls_server, tokens_dir):
    port, creds, digest = tls_server["port"], tls_server["creds"], tls_server["digest"]
    journal = tls_server["out"] / "journal"
    clients = [Client(port, token(tokens_dir, i), creds) for i in range(N)]
    for i, c in enumerate(clients):
        c.register(i, digest)
    c0 = clients[0]
    header, task = c0.fetch(0)
    assert header.status == pb.READY and header.round == 1
    assert header.num_tensors == len(task)
    a_key = next(k for k in sorted(task) if k.endswith("lora_a"))
    rank = task[a_key].shape[1]
    assert rank == header.rank

    def refused(frames, code, *words, client=c0):
        with pytest.raises(grpc.RpcError) as e:
            client.upload(frames)
        assert e.value.code() == code, e.value.details()
        for w in words:
            assert w in e.value.details(), e.value.details()
        # the global state is unchanged: nothing journaled, the same task is still open
        assert list(journal.glob("*.npz")) == []
        h2, t2 = c0.fetch(0)
        assert h2.status == pb.READY and h2.round == 1
        assert all(np.array_equal(t2[k], task[k]) for k in task)

    good = stand_in_update(0, header, task)
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    # malformed streams
    refused(good[1:], INVALID, "must start with an UpdateHeader")
    refused(good[:-1], INVALID, "no UpdateStats")
    refused([good[0], pb.UpdateFrame(chunk=pb.TensorChunk(data=b"1234"))] + good[1:], INVALID,
            "before any tensor header")
    bad_dtype = [good[0], pb.UpdateFrame(chunk=pb.TensorChunk(
        header=pb.TensorHeader(name="lora/x", dtype="complex64", shape=[2]), data=b""))]
    refused(bad_dtype + good[1:], INVALID, "unknown dtype")
    short = list(good)
    short[1] = pb.UpdateFrame(chunk=pb.TensorChunk(header=short[1].chunk.header,
                                                   data=short[1].chunk.data[:-4]))
    refused(short, INVALID, "cut short")
    # wrong shape (a rank the server did not plan), wrong dtype, NaN, bad statistics
    wrong = np.zeros((task[a_key].shape[0], rank + 1), np.float32)
    refused(stand_in_update(0, header, task, **{a_key: wrong}), INVALID,
            a_key[len("lora/"):], "shape", "planned rank")
    refused(stand_in_update(0, header, task, **{a_key: task[a_key].astype(np.float16)}),
            INVALID, "dtype float16")
    refused(stand_in_update(0, header, task, nan=True), INVALID, "NaN")
    refused(stand_in_update(0, header, task, loss_after=float("inf")), INVALID, "loss_after")
    refused(stand_in_update(0, header, task, head_masks=np.full_like(task["head_masks"], 2)),
            INVALID, "head_masks")
    # oversized: an upload declaring more than the limit, and one message over gRPC's limit
    big = np.zeros((4096, 1024), np.float32)  # 16 MiB
    refused(stand_in_update(0, header, task, **{"lora/extra": big}),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit")
    huge = [good[0], pb.UpdateFrame(chunk=pb.TensorChunk(
        header=pb.TensorHeader(name="lora/x", dtype="uint8", shape=[5 << 20]),
        data=bytes(5 << 20)))] + good[1:]
    unlimited = Client(port, token(tokens_dir, 0), creds, max_message_bytes=64 << 20)
    refused(huge, grpc.StatusCode.RESOURCE_EXHAUSTED, client=unlimited)
    # stale / early rounds
    early = stand_in_update(0, header, task)
    early[0] = pb.UpdateFrame(header=pb.UpdateHeader(device_id=0, round=2,
                                                     num_tensors=early[0].header.num_tensors))
    refused(early, grpc.StatusCode.FAILED_PRECONDITION, "stale", "round 2")
    # a device cannot upload for another one
    with pytest.raises(grpc.RpcError) as e:
        clients[1].upload(good)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # the good update is accepted as the first of the round; a retry is a duplicate; a
    # different second update is refused
    r = c0.upload(good)
    assert not r.duplicate and r.current_round == 1
    assert len(list(journal.glob("*.npz"))) == 1
    assert c0.upload(good).duplicate
    with pytest.raises(grpc.RpcError) as e:
        c0.upload(stand_in_update(0, header, task, loss_after=0.5))
    assert e.value.code() == INVALID and "different update" in e.value.details()
    assert c0.fetch(0, wait_s=0.5)[0].status == pb.WAIT

    # device 1 reports: the quorum (2 of 3) closes the round without device 2, whose
    # round-1 update is then stale, as is device 0's
    h2, t2 = clients[2].fetch(2)
    h1, t1 = clients[1].fetch(1)
    pruned = t1["head_masks"].copy()
    pruned[0, 0] = 0.0  # device 1 prunes a head this round
    assert "head_importance" not in t1   # round 1: no importance measured yet
    imp_h = np.random.default_rng(1).random(t1["head_masks"].shape).astype(np.float32)
    assert not clients[1].upload(stand_in_update(1, h1, t1, head_masks=pruned,
                                                 head_importance=imp_h)).duplicate
    h, t = c0.fetch(0, wait_s=60)
    assert h.status == pb.READY and h.round == 2
    for i, frames in ((2, stand_in_update(2, h2, t2)), (0, good)):
        with pytest.raises(grpc.RpcError) as e:
            clients[i].upload(frames)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stale" in e.value.details() and "collecting round 2" in e.value.details()
    # the server's record of device 1's masks travels with its next task, and an update
    # that revives the pruned head is refused
    # with the importance it measured: an agent keeps nothing between rounds, so a restarted
    # one (this fetch is a new task) prunes its round 2 with its round-1 importance
    h1, t1 = clients[1].fetch(1)
    assert h1.round == 2 and t1["head_masks"][0, 0] == 0.0
    assert t1["head_masks"].sum() == t["head_masks"].sum() - 1
    np.testing.assert_array_equal(t1["head_importance"], imp_h)
    assert not t["head_importance"].any()   # device 0's stand-in update reported zeros
    with pytest.raises(grpc.RpcError) as e:
        clients[1].upload(stand_in_update(1, h1, t1, head_masks=np.ones_like(pruned)))
    assert e.value.code() == INVALID and "revives" in e.value.details()
    rows = summaries(tls_server["out"])
    assert rows[1]["close_reason"] == "quorum"
    assert rows[1]["devices"] == [0, 1] and rows[1]["stragglers"] == [2]



def test_fetch_model_over_loopback_grpc(tmp_path, tokens_dir, shared_data):
    """A one-round run on an in-process server: devices answer with their tasks' own
    tensors; when the round closes the server exports every device's model and device 0's
    agent fetches its own over FetchModel (bytes and sha256 checked, a second fetch sends
    nothing); another device's token is refused."""
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    import threading

    from fedspine_jax.device_runtime.agent import AgentError, Backoff, DeviceAgent
    from fedspine_jax.device_runtime.inference import load
    from fedspine_jax.export import tensorrt
    from fedspine_jax.export.metadata import sha256_file
    from fedspine_jax.server.coordinator import Coordinator
    from fedspine_jax.server.servicer import make_server

    sets = _sets(shared_data, ["federation.rounds=1"])
    cfg = load_config(TINY, sets)
    coord = Coordinator(cfg, tmp_path / "run")
    server, port = make_server(coord, auth.Tokens.load(tokens_dir / "tokens.json"),
                               "127.0.0.1:0")
    stop = threading.Event()
    runner = threading.Thread(target=coord.run, args=(stop, 2.0), daemon=True)
    runner.start()
    try:
        agents = [DeviceAgent(cfg, i, f"127.0.0.1:{port}", token(tokens_dir, i),
                              backoff=Backoff(give_up_s=30), wait_s=2) for i in range(N)]
        with pytest.raises(AgentError, match="FAILED_PRECONDITION.*run is not over"):
            agents[0].fetch_model(tmp_path / "dev0")
        for i in range(N):
            c = Client(port, token(tokens_dir, i))
            c.register(i, config_digest(cfg))
            header, task = c.fetch(i)
            assert not c.upload(stand_in_update(i, header, task)).duplicate
        deadline = time.monotonic() + 60
        while not coord.done and time.monotonic() < deadline:  # the runner closes the round
            time.sleep(0.05)
        assert coord.done
        onnx = agents[0].fetch_model(tmp_path / "dev0")  # waits while the server exports
        served = coord.models.get(0, 0)
        assert [f.name for f in served] == ["model.onnx"] and onnx.name == "model.onnx"
        for f in served:
            got = tmp_path / "dev0" / f.name
            assert got.stat().st_size == f.size
            assert got.read_bytes() == f.path.read_bytes()
            assert sha256_file(got) == f.sha256
        assert not list((tmp_path / "dev0").glob("*.part"))
        stamp = onnx.stat().st_mtime_ns
        assert agents[0].fetch_model(tmp_path / "dev0") == onnx
        assert onnx.stat().st_mtime_ns == stamp  # already held: not sent again
        pred = load(onnx)
        assert pred.meta.source["device_id"] == 0 and pred.meta.source["round"] == 1
        assert len(pred.classify(["a gripping film"])) == 1
        if not tensorrt.available():
            assert agents[0].prepare_engine(onnx, tmp_path / "engines") is None
        other = Client(port, token(tokens_dir, 1))
        with pytest.raises(grpc.RpcError) as e:
            list(other.stub.FetchModel(pb.FetchModelRequest(device_id=0), metadata=other.md,
                                       timeout=30))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for i in (1, 2):
            agents[i].fetch_model(tmp_path / f"dev{i}")
        runner.join(60)
        assert not runner.is_alive()
        manifest = json.loads((tmp_path / "run" / "models" / "manifest.json").read_text())
        assert sorted(manifest["files"]) == ["0", "1", "2"] and manifest["errors"] == {}
    finally:
        stop.set()
        server.stop(0)


@pytest.mark.slow
def test_three_devices_match_simulation(tmp_path, tokens_dir, shared_data, reference):
    """Three agents against a server: the run ends in the simulator's state, bit for bit,
    and the scheduler saw the simulator's times and rewards device by device."""
    sets = _sets(shared_data, NO_EXPORT)  # the fetch test covers the end-of-run export
    cfg = load_config(TINY, sets)
    out = tmp_path / "run"
    server, agents = LocalServer(cfg, out, tokens_dir), Agents()
    try:
        for i in range(N):
            agents.start(cfg, i, server.port, tokens_dir)
        server.wait(300)
        agents.wait(60)
    finally:
        server.close()
    rows = summaries(out)
    assert sorted(rows) == [1, 2, 3]
    for t in rows:
        assert rows[t]["close_reason"] == "all devices answered"
        assert rows[t]["devices"] == [0, 1, 2] and rows[t]["stragglers"] == []
    assert_same_final_state(out, reference, cfg)
    mine, theirs = device_rows(out), device_rows(reference)
    assert mine.keys() == theirs.keys()
    for key, row in mine.items():
        for f in ("completion_time", "compute_time", "comm_time", "flops", "p", "r"):
            assert row[f] == pytest.approx(theirs[key][f], rel=1e-12), (key, f)
        for f in ("reward", "loss_drop", "lora_importance", "ratio", "accuracy"):
            assert row[f] == pytest.approx(theirs[key][f], abs=1e-6), (key, f)
    s_mine, s_ref = (json.loads((o / "summary.json").read_text()) for o in (out, reference))
    for f in ("final_accuracy", "final_sparsity", "simulated_time_s", "mean_waiting_time_s"):
        assert s_mine[f] == pytest.approx(s_ref[f], abs=1e-6), f


@pytest.mark.slow
def test_server_sigkill_and_restart_loses_nothing(procs, env, tmp_path, tokens_dir,
                                                  shared_data, reference):
    """SIGKILL the server process right after it acknowledged an update of round 2 (devices
    1 and 2 held back, so the kill lands mid-round); restart it on the same port with
    --resume. The devices reconnect and the run ends in the state of an uninterrupted run
    (the simulator's, which the test above shows the gRPC run equals)."""
    sets = _sets(shared_data, NO_EXPORT)
    cfg = load_config(TINY, sets)
    out = tmp_path / "run"
    server, port = start_server(procs, env, tmp_path, "server", sets,
                                tokens_dir / "tokens.json", out)
    agents = Agents()
    for i in range(N):
        agents.start(cfg, i, port, tokens_dir, hold_round=2 if i else None)
    server.wait_for(r"round 2: update from device 0 accepted", 300)
    server.kill()
    agents.release.set()
    assert (out / "journal").is_dir() and list((out / "journal").glob("r00002_*.npz"))
    server2, port2 = start_server(procs, env, tmp_path, "server-restarted", sets,
                                  tokens_dir / "tokens.json", out,
                                  listen=f"127.0.0.1:{port}", extra=("--resume",))
    assert port2 == port
    m = server2.wait_for(r"resumed from checkpoint round_00001: collecting round 2, "
                         r"(\d+) journal entries replayed", 60)
    assert int(m.group(1)) >= 1
    assert server2.wait(300) == 0, server2.text()[-3000:]
    agents.wait(60)
    rows = summaries(out)
    assert sorted(rows) == [1, 2, 3]
    assert all(rows[t]["devices"] == [0, 1, 2] for t in rows)
    assert_same_final_state(out, reference, cfg)


@pytest.mark.slow
def test_device_killed_mid_round_round_closes_at_deadline(procs, env, tmp_path, tokens_dir,
                                                         shared_data):
    """Device 2's agent process is SIGKILLed while training round 1: the round closes at
    its deadline with devices 0 and 1; restarted, device 2 rejoins and round 2 closes with
    all three."""
    deadline = 25.0
    sets = _sets(shared_data, [f"federation.deadline_s={deadline}", "federation.rounds=2",
                               *NO_EXPORT])
    cfg = load_config(TINY, sets)
    out = tmp_path / "run"
    server, agents = LocalServer(cfg, out, tokens_dir), Agents()
    try:
        # device 2 first: its fetch opens round 1 and starts the deadline's clock
        dev2 = start_device(procs, env, tmp_path, 2, server.port, sets, tokens_dir)
        dev2.wait_for(r"round 1: training", 240, poll=0.02)
        dev2.kill()
        for i in (0, 1):
            agents.start(cfg, i, server.port, tokens_dir)
        first = wait_for_round(out, 1, 120)
        rejoined = agents.start(cfg, 2, server.port, tokens_dir, name="device2-again")
        server.wait(300)
        agents.wait(60)
    finally:
        server.close()
    rows = summaries(out)
    assert first["close_reason"] == "deadline" == rows[1]["close_reason"]
    assert rows[1]["devices"] == [0, 1] and rows[1]["stragglers"] == [2]
    assert rows[1]["wall_time_s"] >= deadline - 0.5
    assert rows[2]["close_reason"] == "all devices answered"
    assert rows[2]["devices"] == [0, 1, 2]
    assert rejoined.rounds_done == 1


# ---------------------------------------------------------------------------------------
# hardening: limits on upload metadata, fairness between devices, secrets


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory, shared_data):
    """An in-process server (no round driver) whose streams stall out after 1 s, at most 2
    calls per device, with tokens of its own (a test rotates them)."""
    from fedspine_jax.server.coordinator import Coordinator
    from fedspine_jax.server.servicer import Limits, make_server

    sets = _sets(shared_data, NO_EXPORT)
    cfg = load_config(TINY, sets)
    d = tmp_path_factory.mktemp("strict")
    tokens_dir = d / "tokens"
    auth.write_tokens(tokens_dir, N)
    coord = Coordinator(cfg, d / "run")
    server, port = make_server(coord, auth.Tokens.load(tokens_dir / "tokens.json"),
                               "127.0.0.1:0", limits=Limits(calls_per_device=2, stall_s=1.0,
                                                            spare_workers=2))
    yield {"port": port, "digest": config_digest(cfg), "coord": coord, "tokens": tokens_dir}
    server.stop(0)


def test_upload_metadata_limits_refused_as_invalid_argument(strict_server):
    """Absurd shapes, long names, too many tensors and empty-chunk floods are refused with
    INVALID_ARGUMENT as the frames arrive (the stream is not read to its end)."""
    port, digest, tokens_dir = (strict_server[k] for k in ("port", "digest", "tokens"))
    c = Client(port, token(tokens_dir, 2))
    c.register(2, digest)
    header, task = c.fetch(2)
    good = stand_in_update(2, header, task)

    def refused(frames, *words):
        with pytest.raises(grpc.RpcError) as e:
            c.upload(frames)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        for w in words:
            assert w in e.value.details(), e.value.details()

    def tensor(name, shape, dtype="float32", data=b""):
        return pb.UpdateFrame(chunk=pb.TensorChunk(
            header=pb.TensorHeader(name=name, dtype=dtype, shape=shape), data=data))

    refused([good[0], tensor("lora/x", [0, 1 << 62])] + good[1:], "absurd shape")
    refused([good[0], tensor("lora/x", [1] * 9)] + good[1:], "dimensions")
    refused([good[0], tensor("lora/" + "x" * 300, [1], data=bytes(4))] + good[1:],
            "longer than 256 bytes")
    refused([good[0], tensor("lora/x", [-3])] + good[1:], "negative dimension")
    many = [tensor(f"lora/t{i}", [0]) for i in range(10_000)]
    refused([good[0]] + many + good[1:], "more than", "tensors")
    head = pb.UpdateFrame(header=pb.UpdateHeader(device_id=2, round=header.round,
                                                 num_tensors=1 << 20))
    refused([head] + good[1:], "announces 1048576 tensors")
    empty = [pb.UpdateFrame(chunk=pb.TensorChunk()) for _ in range(200_000)]

    def empties():  # the server must refuse at the first: it never asks for the rest
        yield good[0]
        yield good[1]
        yield from empty

    t0 = time.monotonic()
    refused(empties(), "empty chunk")
    assert time.monotonic() - t0 < 20
    # a well-formed upload still goes through
    assert not c.upload(good).duplicate


def test_error_details_carry_no_server_paths():
    from fedspine_jax.server.servicer import public

    msg = public("exporting failed: [Errno 28] No space left on device: "
                 "'/srv/fl/run/models/device_0/model.onnx' (lora/x, /tmp)")
    assert "/srv" not in msg and "/tmp" not in msg and "<path>" in msg and "lora/x" in msg


def test_one_device_cannot_starve_the_others(strict_server):
    """Device 0 opens many uploads that send a header and go silent, and floods long polls:
    its calls beyond the per-device cap are refused, its stalled ones are cut by the server,
    and device 1 is served throughout."""
    port, digest, tokens_dir = (strict_server[k] for k in ("port", "digest", "tokens"))
    bad = Client(port, token(tokens_dir, 0))
    bad.register(0, digest)
    release = threading.Event()

    def stalled():
        yield pb.UpdateFrame(header=pb.UpdateHeader(device_id=0, round=1, num_tensors=1))
        release.wait(120)

    uploads = [bad.stub.UploadUpdate.future(stalled(), metadata=bad.md, timeout=120)
               for _ in range(30)]
    polls = [bad.stub.FetchTask(pb.FetchTaskRequest(device_id=0, wait_s=30),
                                metadata=bad.md, timeout=120) for _ in range(30)]
    try:
        good = Client(port, token(tokens_dir, 1))

        def retried(fn):  # as an agent does while the server is at its limit of calls
            for _ in range(50):
                try:
                    return fn()
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    time.sleep(0.2)
            raise AssertionError("device 1 was refused for 10 s")

        t0 = time.monotonic()
        for _ in range(3):
            assert retried(lambda: good.register(1, digest)).num_devices == N
            h, _ = retried(lambda: good.fetch(1))
            assert h.status == pb.READY
        assert time.monotonic() - t0 < 30
        codes = []
        for f in uploads:
            with pytest.raises(grpc.RpcError) as e:
                f.result(timeout=60)  # refused, or cut when it stalled: never left hanging
            codes.append(e.value.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert grpc.StatusCode.CANCELLED in codes
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        assert time.monotonic() - t0 < 60
    finally:
        release.set()
        for p in polls:
            p.cancel()


def test_token_rotation_and_revocation_without_restart(strict_server):
    """The running server re-reads its tokens file: a rotated device's old token is refused
    and its new one accepted; a revoked device is refused."""
    port, digest, d = (strict_server[k] for k in ("port", "digest", "tokens"))
    old = token(d, 2)
    assert Client(port, old).register(2, digest).num_devices == N
    new_file = auth.rotate_token(d / "tokens.json", 2)
    assert new_file == d / "device_2.token" and token(d, 2) != old
    with pytest.raises(grpc.RpcError) as e:
        Client(port, old).register(2, digest)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert Client(port, token(d, 2)).register(2, digest).num_devices == N
    auth.revoke_token(d / "tokens.json", 2)
    with pytest.raises(grpc.RpcError) as e:
        Client(port, token(d, 2)).register(2, digest)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert Client(port, token(d, 0)).register(0, digest).num_devices == N


def test_token_files_hashed_and_owner_only(tmp_path):
    d = tmp_path / "secrets"
    path = auth.write_tokens(d, 2)
    tok = auth.read_token(d / "device_1.token")
    raw = json.loads(path.read_text())
    assert tok not in path.read_text() and set(raw["devices"]["1"]) == {"salt", "sha256"}
    for f in (path, d / "device_0.token", d / "device_1.token"):
        assert f.stat().st_mode & 0o777 == 0o600
    assert auth.Tokens.load(path).device_of(tok) == 1
    assert auth.Tokens.load(path).device_of(tok[:-1] + "x") is None
    # a group/world-readable file is refused with the fix; --init-tokens over it repairs it
    for f in (path, d / "device_1.token"):
        f.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        auth.Tokens.load(path)
    with pytest.raises(ValueError, match="chmod 600"):
        auth.read_token(d / "device_1.token")
    auth.write_tokens(d, 2)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (d / "device_1.token").stat().st_mode & 0o777 == 0o600
    # a plain (old-format) tokens file is refused, naming the fix
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"0": "x" * 43}))
    plain.chmod(0o600)
    with pytest.raises(ValueError, match="--init-tokens"):
        auth.Tokens.load(plain)


def test_plaintext_server_on_a_public_address_needs_insecure(tmp_path, tokens_dir, env):
    r = subprocess.run(_fedspine("server", str(TINY), "--listen", "0.0.0.0:0", "--tokens",
                                 str(tokens_dir / "tokens.json"), "--out", str(tmp_path / "r")),
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "without TLS" in err[0] and "--insecure" in err[0], r.stderr
    assert not (tmp_path / "r").exists()


def test_plaintext_device_to_a_public_address_needs_insecure(tmp_path, tokens_dir, env):
    r = subprocess.run(_fedspine("device", "--server", "192.0.2.1:50051", "--device-id", "0",
                                 "--token-file", str(tokens_dir / "device_0.token"),
                                 "--config", str(TINY), "--give-up-s", "1"),
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "without TLS" in err[0] and "--insecure" in err[0], r.stderr


def test_default_round_deadline_and_waiting_log(strict_server, monkeypatch, caplog):
    """With the default config a round has a deadline, and an open round names the devices
    it waits for."""
    from fedspine_jax.server import coordinator

    coord = strict_server["coord"]
    assert coord.cfg.federation.deadline_s == 0.0
    assert coord.deadline_s == coordinator.DEFAULT_DEADLINE_S > 0
    coord.fetch(0, 0.0)  # opens the round if no earlier test did
    monkeypatch.setattr(coordinator, "WAITING_LOG_S", 0.0)
    with caplog.at_level("INFO", logger="fedspine.server"), coord._cv:
        coord._log_waiting()
    waiting = sorted(set(range(N)) - coord._answered())
    assert f"waiting for devices {waiting}" in caplog.text


def test_storage_fault_reaches_the_device_as_unavailable(tmp_path, tokens_dir, shared_data):
    """A journal write that fails (here its directory is gone) refuses the upload and the
    give-up with UNAVAILABLE (the device retries), names no server path, and acknowledges
    nothing."""
    from fedspine_jax.server.coordinator import Coordinator
    from fedspine_jax.server.servicer import make_server

    cfg = load_config(TINY, _sets(shared_data, NO_EXPORT))
    coord = Coordinator(cfg, tmp_path / "run")
    server, port = make_server(coord, auth.Tokens.load(tokens_dir / "tokens.json"),
                               "127.0.0.1:0")
    try:
        shutil.rmtree(coord.jdir)
        c = Client(port, token(tokens_dir, 0))
        c.register(0, config_digest(cfg))
        header, task = c.fetch(0)
        with pytest.raises(grpc.RpcError) as e:
            c.upload(stand_in_update(0, header, task))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert "storage" in e.value.details() and "/" not in e.value.details()
        g = Client(port, token(tokens_dir, 1))
        g.register(1, config_digest(cfg))
        with pytest.raises(grpc.RpcError) as e:
            g.stub.ReportStatus(pb.StatusReport(device_id=1, round=coord.state.round,
                                                state=pb.FAILED),
                                metadata=g.md, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert not coord.state.updates and not coord._gave_up
    finally:
        server.stop(0)
