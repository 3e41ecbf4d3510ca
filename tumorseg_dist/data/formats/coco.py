"""`coco`: COCO instance annotations, e.g. a Roboflow export `ROOT/{train,valid,test}/` with
`_annotations.coco.json` beside the images.

* `file_name` is relative to the JSON's folder; an absolute one or one with `..` is rejected,
  so nothing outside INPUT is ever read.
* Masks: the union of all of an image's annotations (of the `--categories` kept), rasterised
  exactly as pycocotools' `COCO.annToMask` does (polygons, multi-polygons, uncompressed and
  compressed RLE). An image without annotations gets an empty mask.
* Splits come from the JSON's folder (`train`, `valid`/`val` -> `val`, `test`); `--split` is
  ignored then. A single JSON outside such folders is split by `--split`.
* `--categories`: comma-separated category names, or `id:N` for a category id (the names in
  Roboflow exports are often "0"/"1", so ids and names are kept apart). Default: all.
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from .classes import ClassSpec, parse_classes
from .common import (Item, LayoutError, Options, Problem, Scan, SPLIT_NAMES,
                     assign_keys, is_image_name, resolved_inside)

_NAME = re.compile(r"(_annotations\.coco|.*coco.*|instances.*|annotations.*)\.json", re.I)


def annotation_files(files: list[str]) -> list[str]:
    return [f for f in files if _NAME.fullmatch(PurePosixPath(f).name)]


def detect(root: Path, files: list[str]) -> str | None:
    js = annotation_files(files)
    if not js:
        return None
    return f"COCO annotation file(s): {', '.join(js[:4])}{' ...' if len(js) > 4 else ''}"


def _split_of(json_rel: str) -> str | None:
    p = PurePosixPath(json_rel)
    if p.parent.name.lower() in SPLIT_NAMES:
        return SPLIT_NAMES[p.parent.name.lower()]
    for tok in re.split(r"[^a-z]+", p.stem.lower()):
        if tok in SPLIT_NAMES:
            return SPLIT_NAMES[tok]
    return None


def _category_ids(cats: list[dict], tok: str, where: str, flag: str) -> set:
    """The category ids one `--categories`/`--classes` KEY names: a name, or id:N."""
    if tok.startswith("id:"):
        try:
            cid = int(tok[3:])
        except ValueError:
            raise LayoutError(f"{flag} {tok!r}: an id must be a number, e.g. id:1") from None
        found = {cid} & {c["id"] for c in cats}
    else:
        found = {c["id"] for c in cats if str(c.get("name")) == tok}
    if not found:
        avail = ", ".join(f"id:{c['id']} name {c.get('name')!r}" for c in cats)
        raise LayoutError(f"{flag} {tok!r} matches no category in {where} (it has: {avail}); "
                          f"use one of those names or ids")
    return found


def _category_filter(cats: list[dict], spec: str | None, where: str) -> set:
    if not spec:
        return {c["id"] for c in cats}
    keep = set()
    for tok in (t.strip() for t in spec.split(",") if t.strip()):
        keep |= _category_ids(cats, tok, where, "--categories")
    return keep


def _class_map(cats: list[dict], spec: ClassSpec, where: str) -> tuple[dict, list[str]]:
    """--classes -> ({category id: class id}, class names: a KEY id:N is named by its category)."""
    cmap, by_id = {}, {c["id"]: str(c.get("name")) for c in cats}
    for key, cid in spec.entries:
        for cat in _category_ids(cats, key, where, "--classes"):
            cmap[cat] = cid
    return cmap, spec.names(lambda k: by_id[int(k[3:])] if k.startswith("id:") else k)


def _safe_file_name(name, json_rel: str, root: Path, base: Path) -> tuple[str | None, str]:
    if not isinstance(name, str) or not name:
        return None, "has no file_name"
    if (name.startswith(("/", "\\")) or PureWindowsPath(name).drive or PurePosixPath(name).is_absolute()):
        return None, f"file_name {name!r} is an absolute path (only paths inside INPUT are read)"
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        return None, f"file_name {name!r} contains '..' (only paths inside INPUT are read)"
    src = resolved_inside(root, base / name)
    if src is None:
        return None, f"file_name {name!r} points outside INPUT through a link"
    return src, ""


def scan(root: Path, files: list[str], opts: Options) -> Scan:
    jsons = annotation_files(files)
    if not jsons:
        raise LayoutError(f"no COCO annotation file under {root} (looked for _annotations.coco.json, "
                          f"instances*.json, annotations*.json, *coco*.json)")
    splits = [_split_of(j) for j in jsons]
    given = all(s is not None for s in splits)
    if not given and len(jsons) > 1:
        raise LayoutError("several COCO files whose split is not clear from their folder or name: "
                          + ", ".join(jsons) + "; put each in a train/ valid/ test/ folder or pack them one by one")
    spec = parse_classes(opts.classes)
    if spec is not None and opts.categories:
        raise LayoutError("--categories and --classes both choose categories; give only --classes "
                          "(categories it leaves out are not drawn)")
    items, problems, listed, class_names = [], [], set(), None
    for jrel, split in zip(jsons, splits):
        try:
            data = json.loads((root / jrel).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LayoutError(f"{jrel} is not valid JSON ({e}); re-export the annotations") from e
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise LayoutError(f"{jrel} has no 'images' list: not a COCO annotation file")
        keep = _category_filter(data.get("categories") or [], opts.categories, jrel)
        if spec is not None:
            cmap, names = _class_map(data.get("categories") or [], spec, jrel)
            if class_names is not None and names != class_names:
                raise LayoutError(f"--classes {spec.text}: {jrel} names the classes {names} but "
                                  f"{jsons[0]} {class_names}; give the categories by id:N or fix the files")
            class_names, keep = names, set(cmap)
        base = (root / jrel).parent
        images: dict = {}
        for im in data["images"]:
            if im.get("id") in images:
                raise LayoutError(f"{jrel}: image id {im.get('id')} is listed twice; fix the annotation file")
            images[im.get("id")] = im
        anns: dict = {}
        for a in data.get("annotations") or []:
            if a.get("image_id") not in images:
                problems.append(Problem(f"{jrel}#annotation={a.get('id')}",
                                        f"refers to image_id {a.get('image_id')}, which is not in 'images'",
                                        "fix the image_id or remove the annotation"))
                continue
            if a.get("category_id") in keep:
                anns.setdefault(a["image_id"], []).append(a)
        for iid, im in images.items():
            src, why = _safe_file_name(im.get("file_name"), jrel, root, base)
            where = f"{jrel}#image_id={iid}"
            if src is None:
                problems.append(Problem(where, why, "fix file_name in the annotation file"))
                continue
            listed.add(src)
            if not (root / src).is_file():
                problems.append(Problem(src, f"is listed in {jrel} (image_id {iid}) but does not exist",
                                        "add the image or remove it from the annotation file"))
                continue
            try:
                h, w = int(im["height"]), int(im["width"])
            except (KeyError, TypeError, ValueError):
                problems.append(Problem(where, "has no valid height/width", "fix the annotation file"))
                continue
            its = sorted(anns.get(iid, []), key=lambda a: str(a.get("id")))
            segs = [[a.get("id"), a.get("segmentation")] for a in its]
            ms = [f"{jrel}#annotation={a.get('id')}" for a in its] or [jrel]
            items.append(Item("", src, ms, split=split, coco={"height": h, "width": w, "segmentations": segs},
                              classes=None if spec is None else [cmap[a["category_id"]] for a in its]))
    json_dirs = {PurePosixPath(j).parent.as_posix() for j in jsons}
    for f in files:
        if is_image_name(f) and f not in listed and PurePosixPath(f).parent.as_posix() in json_dirs:
            problems.append(Problem(f, "is an image beside a COCO file that does not list it",
                                    "add it to the annotation file or remove it"))
            listed.add(f)
    assign_keys(items)
    notes = ["masks: union of each image's annotations (pycocotools annToMask); no annotation = empty mask"
             if spec is None else
             f"masks: each annotation drawn with its class ({', '.join(f'{i}={n}' for i, n in enumerate(class_names))}), "
             f"in annotation order; {'label PNG masks' if spec.labels else 'binary masks'}"]
    if given:
        notes.append("splits: given by the annotation files (" + ", ".join(
            f"{j} -> {s}" for j, s in zip(jsons, splits)) + "); --split ignored")
    return Scan(items, problems, [f for f in files if f not in listed and f not in jsons], notes,
                given_splits=given, extra_files=list(jsons), class_names=class_names)

