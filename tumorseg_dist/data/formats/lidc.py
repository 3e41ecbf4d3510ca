"""`lidc`: `PATIENT/nodule-K/images/slice-S.png` + `PATIENT/nodule-K/mask-R/slice-S.png`.

Each slice has one mask per reader (LIDC-IDRI: up to 4 radiologists). `--mask-fusion` picks
the rule: `any` (marked by at least one reader, the default), `majority` (by more than half
of the nodule's readers: 3 of 4) or `reader:K` (only `mask-K/`). The group is the patient
folder (the parent of `nodule-K/`), so one patient's nodules never span two splits.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from .common import Item, LayoutError, Options, Problem, Scan, assign_keys, is_image_name

_MASK_DIR = re.compile(r"mask-(\d+)")


def _nodules(files: list[str]) -> dict[str, dict[str, list[str]]]:
    """nodule dir -> {"images": [names], "mask-0": [names], ...} for dirs with images/ + mask-R/."""
    tree: dict[str, dict[str, list[str]]] = {}
    for f in files:
        p = PurePosixPath(f)
        if len(p.parts) < 3:
            continue
        sub = p.parent.name
        if sub == "images" or _MASK_DIR.fullmatch(sub):
            tree.setdefault(p.parent.parent.as_posix(), {}).setdefault(sub, []).append(p.name)
    return {d: t for d, t in tree.items() if "images" in t and any(_MASK_DIR.fullmatch(k) for k in t)}


def detect(root: Path, files: list[str]) -> str | None:
    nod = _nodules(files)
    if not nod:
        return None
    patients = {PurePosixPath(d).parent.as_posix() for d in nod}
    return (f"folders with images/ + mask-R/ readers side by side ({len(nod)} nodule folders, "
            f"{len(patients)} patient folders)")


def _readers(t: dict[str, list[str]]) -> list[str]:
    return sorted((k for k in t if _MASK_DIR.fullmatch(k)), key=lambda k: int(k.split("-")[1]))


def scan(root: Path, files: list[str], opts: Options) -> Scan:
    nod = _nodules(files)
    if not nod:
        raise LayoutError(f"no LIDC layout under {root}: expected PATIENT/nodule-K/images/slice-S.png "
                          f"with PATIENT/nodule-K/mask-R/slice-S.png beside it")
    if opts.classes is not None:
        raise LayoutError(f"--classes {opts.classes}: LIDC masks are one class (nodule), marked by up to 4 "
                          f"readers; leave --classes out (--mask-fusion decides how the readers combine)")
    rule = opts.mask_fusion
    reader = None
    if rule.startswith("reader:"):
        try:
            reader = int(rule.split(":", 1)[1])
        except ValueError:
            raise LayoutError(f"--mask-fusion {rule!r}: K must be a number, e.g. reader:0") from None
    elif rule not in ("any", "majority"):
        raise LayoutError(f"--mask-fusion {rule!r}: use any, majority or reader:K")
    items, problems, used = [], [], set()
    for d, t in sorted(nod.items()):
        readers = _readers(t)
        if reader is not None:
            if f"mask-{reader}" not in t:
                raise LayoutError(f"{d}/ has no mask-{reader}/ folder for --mask-fusion {rule} "
                                  f"(it has {', '.join(readers)}); choose another reader or any/majority")
            readers = [f"mask-{reader}"]
        group = PurePosixPath(d).parent.name or PurePosixPath(d).name
        have = {r: set(t[r]) for r in _readers(t)}
        for name in sorted(t["images"]):
            src = f"{d}/images/{name}"
            if not is_image_name(name):
                continue
            used.add(src)
            missing = [r for r in readers if name not in have[r]]
            if missing:
                problems.append(Problem(src, f"has no mask in {', '.join(f'{d}/{r}/' for r in missing)}",
                                        f"add {d}/{missing[0]}/{name} or remove the image"))
                continue
            ms = [f"{d}/{r}/{name}" for r in readers]
            used.update(f"{d}/{r}/{name}" for r in have)
            items.append(Item("", src, ms, group=group, fusion="any" if reader is not None else rule))
        imgs = set(t["images"])
        for r in _readers(t):
            for name in sorted(have[r] - imgs):
                if is_image_name(name):
                    used.add(f"{d}/{r}/{name}")
                    problems.append(Problem(f"{d}/{r}/{name}", f"is a mask without an image in {d}/images/",
                                            "add the image or remove the mask"))
    assign_keys(items)
    notes = [f"pairs: nodule-K/images/S + nodule-K/mask-R/S for every reader R; fusion {rule}"
             + (" (more than half of the readers)" if rule == "majority" else ""),
             f"groups: patient folder ({len({it.group for it in items})} patients)"]
    return Scan(items, problems, [f for f in files if f not in used], notes)
