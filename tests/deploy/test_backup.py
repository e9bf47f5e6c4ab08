"""Backup and restore through `sglang-server backup`: a round trip re-warms the prefix cache of
a fresh server; an interrupted create leaves no broken entry; missing or damaged backups are
clear errors."""

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from sglang_testing import BINARY, Server

PREFIX = "You are a meticulous assistant who answers in short sentences. " * 8


def backup(*args, check=True):
    out = subprocess.run([str(BINARY), "backup", *args], capture_output=True, text=True,
                         env=dict(os.environ, SGLANG_ADMIN_API_KEY="adm"))
    if check:
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    return out


def ask(server, question):
    return server.post("/generate", {"text": PREFIX + question, "sampling_params": {"max_new_tokens": 3}})[2]


def test_round_trip_and_failures():
    d = Path(tempfile.mkdtemp())
    s = Server("--admin-api-key", "adm")
    try:
        ask(s, "What is 2+2?")
        url = f"http://127.0.0.1:{s.port}"
        entry = backup("create", "--server-url", url, "--backup-dir", str(d), "--backup-name", "first")
        assert entry["cached_prefixes"] >= 1 and entry["cached_tokens"] >= 64
        # the admin endpoints need the key
        assert s.request("GET", "/admin/cache/state")[0] == 401
        assert s.post("/admin/checkpoint", {})[0] == 401
    finally:
        s.stop()
    fresh = Server("--admin-api-key", "adm")
    try:
        url = f"http://127.0.0.1:{fresh.port}"
        out = backup("restore", "--server-url", url, "--backup-dir", str(d), "--backup-name", "first")
        assert out["same_model"] is True and out["cache"]["warmed"] >= 1
        r = ask(fresh, "Name a fruit.")
        # the backed-up prefix: whole 16-token pages of the shared system text
        assert r["meta_info"]["cached_tokens"] >= 64, r["meta_info"]
        # an interrupted create: killed while copying the model
        p = subprocess.Popen([str(BINARY), "backup", "create", "--server-url", url, "--backup-dir", str(d),
                              "--backup-name", "second", "--include-model"],
                             env=dict(os.environ, SGLANG_ADMIN_API_KEY="adm"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill it as soon as its temporary directory exists: half-way for certain
        deadline = time.time() + 30
        while not list(d.glob(".second.partial-*")) and time.time() < deadline:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL
        listing = backup("list", "--backup-dir", str(d))
        names = [b["name"] for b in listing["backups"]]
        assert names == ["first"] and listing["backups"][0]["status"] == "ok", listing
        out = backup("restore", "--server-url", url, "--backup-dir", str(d), "--backup-name", "second", check=False)
        assert out.returncode != 0 and ("no backup" in out.stderr or "not a complete backup" in out.stderr), out.stderr
        # missing and damaged backups
        out = backup("restore", "--server-url", url, "--backup-dir", str(d), "--backup-name", "nope", check=False)
        assert out.returncode != 0 and "no backup named" in out.stderr
        (d / "first" / "cache" / "cache_state.json").write_text("{broken")
        out = backup("restore", "--server-url", url, "--backup-dir", str(d), "--backup-name", "first", check=False)
        assert out.returncode != 0 and "damaged" in out.stderr, out.stderr
        assert "damaged" in backup("list", "--backup-dir", str(d))["backups"][0]["status"]
        assert backup("delete", "--backup-dir", str(d), "--backup-name", "first")["deleted"] == "first"
        assert backup("list", "--backup-dir", str(d))["total_count"] == 0
        # a later create cleans up what the killed one left
        backup("create", "--server-url", url, "--backup-dir", str(d), "--backup-name", "third")
        assert not list(d.glob(".second.partial-*"))
    finally:
        fresh.stop()
