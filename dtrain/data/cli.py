"""dtrain-data: index, check and describe TFRecord files.

    dtrain-data index train-*.tfrecord          # writes <file>.idx ("offset length" per record)
    dtrain-data check train-*.tfrecord          # every bad record with its byte offset; exit 1 if any
    dtrain-data stats train-*.tfrecord          # the features found, their kinds and counts, a spec

Compression is taken from --compression, or from a .gz/.gzip/.zlib suffix.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

from dtrain.errors import DtrainError

KINDS = {0: "empty", 1: "bytes", 2: "float", 3: "int64"}


def _compression(path: str, given: Optional[str]) -> str:
    if given:
        return "" if given == "none" else given
    low = path.lower()
    if low.endswith((".gz", ".gzip")):
        return "gzip"
    if low.endswith(".zlib"):
        return "zlib"
    return ""


def _bar(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, ncols=90, file=sys.stderr,
                disable=not sys.stderr.isatty())


def _files(patterns: List[str]) -> List[str]:
    from dtrain.data.dataset import expand_files
    return expand_files(patterns)


def _table(rows: List[List[str]], head: List[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def cmd_index(args) -> int:
    from dtrain.data.tfrecord import build_index
    files = _files(args.files)
    bar = _bar(sum(os.path.getsize(f) for f in files), "index")
    rows, failed = [], 0
    for f in files:
        try:
            entries = build_index(f, _compression(f, args.compression) or None)
            rows.append([f, f"{len(entries):,}", f + ".idx"])
        except DtrainError as e:
            failed += 1
            rows.append([f, "-", f"not written: {e}"])
        if bar:
            bar.update(os.path.getsize(f))
    if bar:
        bar.close()
    print(_table(rows, ["file", "records", "index"]))
    return 1 if failed else 0


def cmd_check(args) -> int:
    from dtrain import _C
    files = _files(args.files)
    bar = _bar(sum(os.path.getsize(f) for f in files), "check")
    rows, bad_total = [], 0
    for f in files:
        r = _C.data.RecordReader(f, _compression(f, args.compression), True, True)
        try:
            while r.next() is not None:
                pass
            st = r.stats()
            problems = r.problems()
            rows.append([f, f"{st['records']:,}", f"{st['bad_records']:,}", f"{st['skipped_bytes']:,}"])
        except DtrainError as e:  # the stream itself is unreadable (a cut-short gzip file)
            st, problems = {"bad_records": 1}, [str(e)]
            rows.append([f, "?", "unreadable", "?"])
        bad_total += st["bad_records"]
        for p in problems:
            print(p)
        if st["bad_records"] > len(problems):
            print(f"{f}: ... and {st['bad_records'] - len(problems)} more bad records")
        if bar:
            bar.update(os.path.getsize(f))
    if bar:
        bar.close()
    print(_table(rows, ["file", "good records", "bad records", "bytes skipped"]))
    print(f"{len(files)} file(s): {'all records are sound' if not bad_total else f'{bad_total} bad record(s)'}")
    return 1 if bad_total else 0


def cmd_stats(args) -> int:
    from dtrain import _C
    files = _files(args.files)
    found: Dict[str, Dict[str, object]] = {}
    records = nbytes = bad = 0
    limit = args.records
    for f in files:
        r = _C.data.RecordReader(f, _compression(f, args.compression), True, True)
        while limit is None or records < limit:
            item = r.next()
            if item is None:
                break
            rec, _ = item
            records += 1
            nbytes += len(rec)
            try:
                feats = _C.data.inspect_example(rec)
            except DtrainError:
                bad += 1
                continue
            for name, kind, count, size in feats:
                s = found.setdefault(name, {"kinds": set(), "min": count, "max": count, "present": 0, "bytes": 0})
                s["kinds"].add(kind)
                s["min"], s["max"] = min(s["min"], count), max(s["max"], count)
                s["present"] += 1
                s["bytes"] += size
        bad += r.stats()["bad_records"]
    print(f"{len(files)} file(s), {records:,} records{' read' if limit else ''}, {nbytes:,} payload bytes, "
          f"{bad} bad")
    rows, spec = [], []
    for name in sorted(found):
        s = found[name]
        kinds = "/".join(KINDS[k] for k in sorted(s["kinds"]))
        counts = str(s["min"]) if s["min"] == s["max"] else f"{s['min']}..{s['max']}"
        rows.append([name, kinds, counts, f"{s['present']:,}", f"{s['bytes'] / max(s['present'], 1):,.0f}"
                     if 1 in s["kinds"] else ""])
        spec.append(f"    {name!r}: {_suggest(s, records)},")
    print(_table(rows, ["feature", "kind", "values per record", "records with it", "bytes per record"]))
    print("\nA spec that reads them:\nspec = {\n" + "\n".join(spec) + "\n}")
    return 0


def _suggest(s: Dict[str, object], records: int) -> str:
    kinds = s["kinds"] - {0}
    if len(kinds) != 1:
        return "None  # mixed kinds: " + "/".join(KINDS[k] for k in sorted(s["kinds"]))
    kind = next(iter(kinds))
    if kind == 1:
        return 'FixedLen((), "bytes")' if s["min"] == s["max"] == 1 else 'VarLen("bytes")'
    dtype = "float32" if kind == 2 else "int64"
    if s["min"] == s["max"] and s["present"] == records:
        shape = "()" if s["min"] == 1 else f"({s['min']},)"
        return f'FixedLen({shape}, "{dtype}")'
    return f'VarLen("{dtype}")'


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="dtrain-data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (("index", cmd_index, "write <file>.idx for each file, checking every CRC"),
                            ("check", cmd_check, "list every bad record with its byte offset"),
                            ("stats", cmd_stats, "features found, their kinds and counts, and a spec")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("files", nargs="+", help="files or globs")
        p.add_argument("--compression", choices=["none", "gzip", "zlib"], default=None,
                       help="default: from the suffix (.gz, .gzip, .zlib), else none")
        if name == "stats":
            p.add_argument("--records", type=int, default=None, help="look at the first N records only")
        p.set_defaults(fn=fn)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except DtrainError as e:
        print(f"dtrain-data {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
