"""Helpers shared by the live-server checks (abuse_h2.py, soak.py)."""
import argparse
import re
import urllib.request


def args():
    """The arguments every live check takes: --server host:port, --metrics URL, --pid."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--pid", type=int, required=True)
    return ap.parse_args()


def rss_mib(pid):
    """Resident set size of a process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def metric(url, name):
    """One sample of the server's /metrics (0 when absent)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
