"""What bench/backup.py and bench/backup_speed.py share: a small QMP client and a daemon
started with one exported disk (blockjobd and qemu-storage-daemon take the same options)."""
import json
import os
import socket
import subprocess
import time


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.events = []
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']['desc']}")
            return r["return"]

    def wait_event(self, name, job, timeout=600):
        deadline = time.time() + timeout
        while True:
            for e in self.events:
                if e["event"] == name and e["data"].get("device") == job:
                    self.events.remove(e)
                    return e
            if time.time() > deadline:
                raise RuntimeError(f"no {name} for {job}")
            self.events.append(json.loads(self.f.readline()))

    def wait_gone(self, job):
        deadline = time.time() + 60
        while any(j["id"] == job for j in self.cmd("query-jobs")):
            if time.time() > deadline:
                raise RuntimeError(f"job {job} does not end")
            time.sleep(0.05)
        self.events.clear()


def start(program, d, direct, target_fmt="raw", target="target.raw", stdout=None):
    """Starts `program` in `d` with `disk.raw` as node `disk` (exported writable as `disk`
    over `nbd.sock`) and `target` as node `tgt` in `target_fmt`; returns the process, a
    QMP client and the NBD socket's path."""
    qmp_sock, nbd_sock = os.path.join(d, "qmp.sock"), os.path.join(d, "nbd.sock")
    for s in (qmp_sock, nbd_sock):
        if os.path.exists(s):
            os.unlink(s)
    c = "on" if direct else "off"
    args = [program,
            "--chardev", f"socket,id=m,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=m",
            "--blockdev", f"driver=file,filename={d}/disk.raw,node-name=f0,cache.direct={c}",
            "--blockdev", "driver=raw,file=f0,node-name=disk",
            "--blockdev", f"driver=file,filename={d}/{target},node-name=f1,cache.direct={c}",
            "--blockdev", f"driver={target_fmt},file=f1,node-name=tgt",
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
            "--export", "type=nbd,id=e,node-name=disk,writable=on"]
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout)
    deadline = time.time() + 10
    while not (os.path.exists(qmp_sock) and os.path.exists(nbd_sock)):
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit(f"{program} did not start")
        time.sleep(0.01)
    time.sleep(0.1)
    return p, Qmp(qmp_sock), nbd_sock
