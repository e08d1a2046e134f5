"""Helpers shared by the live-server checks (abuse_h2.py, soak.py)."""
import re
import urllib.request


def rss_mib(pid):
    """Resident set size of a process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def metric(url, name):
    """One sample of the server's /metrics (0 when absent)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
