"""`make audit` (and `make test`): pip-audit over the installed packages.

Fails when a known vulnerability is found. When pip-audit cannot reach its advisory database
(the package index's JSON API, or OSV with AUDIT_SERVICE=osv), or the index does not know the
packages, it says so and passes: a machine without that network is not a vulnerable one, and
operators run the same command where the database is reachable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PIP_AUDIT = Path(sys.executable).with_name("pip-audit")


def main() -> int:
    command = [str(PIP_AUDIT), "--progress-spinner", "off", "--format", "json"]
    command += ["--vulnerability-service", os.environ.get("AUDIT_SERVICE", "pypi")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        why = (run.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"audit: pip-audit could not reach its advisory database ({why}); nothing was checked")
        return 0
    vulnerable = [d for d in report["dependencies"] if d.get("vulns")]
    skipped = [d for d in report["dependencies"] if d.get("skip_reason")]
    audited = len(report["dependencies"]) - len(skipped)
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
            print(f"audit: {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
    print(f"audit: {audited} packages checked, {len(vulnerable)} vulnerable, {len(skipped)} unknown to the database")
    if skipped and not audited:
        print("audit: the advisory database knows none of the installed versions here; run `make audit` where it does")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
