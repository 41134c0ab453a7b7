"""The released story files as downloaded, read without running anything they hold.

The release's ``download.sh`` unpacks ``data/<source>/``: text stories in ``story.h5`` (one
dataset per movie key) and the video+subtitle stories in ``story.hkl``, written from Python 2
with hickle, an HDF5 layout for Python objects: ``{movie_key: {"rgb": array, "sub": array}}``.
:class:`StoryFile` reads either kind with h5py, from the HDF5 structure alone:

* plain HDF5: the root's members are the movie keys;
* hickle 2 and 3 (Python 2 era): ``/data_0`` is the dict, a group whose ``type`` attribute
  says ``dict``; each key is a ``dict_item`` group (named ``key``, ``'key'`` or ``u'key'``)
  holding its value as ``data_0``: an ``ndarray`` dataset or another dict;
* hickle 4 and 5: ``/data`` is the dict; keys are named ``'key'`` (4, as ``dict_item``
  groups holding ``data``) or ``"key"`` (5); a node's kind is its ``base_type`` attribute
  (4) or the name of a dataset of ``/hickle_types_table`` reached through HDF5 object
  references (5). Both also store the Python class as a pickle: it is never unpickled.

A data file is untrusted input. Hickle stores what it cannot map to HDF5 as a pickle and
its loader unpickles it, running whatever the pickle says. This reader never unpickles,
never imports hickle and accepts only dicts and numeric arrays: a node of any other hickle
kind (``pickle`` first of all) is refused with a :class:`~rwmn.data.movieqa.DataError`
naming the file and the node. HDF5 external links, virtual datasets and external raw
storage that point outside the data directory are refused too (:func:`check_node`), in the
story files and the QA files alike.

May import: h5py, rwmn.cli, rwmn.data.errors.
"""

from __future__ import annotations

import os

import h5py

from rwmn.cli import one_line
from rwmn.data.errors import DataError

#: Story file names looked for in ``<data_dir>/<source>/``, in order: the release read
#: ``story.hkl`` for video_sub and ``story.h5`` for the text sources.
STORY_NAMES = {"video_sub": ("story.hkl", "story.h5")}
TEXT_STORY_NAMES = ("story.h5", "story.hkl")
#: How deep a movie's value may nest (a video_sub story is a dict of two arrays).
MAX_DEPTH = 3


def story_names(source: str) -> tuple[str, ...]:
    return STORY_NAMES.get(source, TEXT_STORY_NAMES)


def find_story_file(root: str, source: str) -> str | None:
    """The first story file of ``source`` present in ``root`` (None when there is none)."""
    for name in story_names(source):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _text(value) -> str:
    """An HDF5 attribute holding a string (or a one-element array of one) as str."""
    if hasattr(value, "shape") and getattr(value, "shape", ()) != () and len(value) == 1:
        value = value[0]
    if getattr(getattr(value, "dtype", None), "kind", "") in ("S", "V"):
        value = value.tobytes()
    if isinstance(value, bytes):
        return value.rstrip(b"\0").decode("utf-8", "replace")
    return str(value)


def check_node(group: h5py.Group, name: str, where: str, data_dir: str) -> h5py.HLObject:
    """``group[name]``, after checking the link and, for a dataset, its storage: an
    external link, a virtual dataset's source or an external raw data file must resolve
    inside ``data_dir`` (the file's own directory for relative names)."""
    link = group.get(name, getlink=True)
    if link is None:
        raise DataError(f"{where}: missing")
    base = os.path.dirname(os.path.abspath(group.file.filename))
    if isinstance(link, h5py.ExternalLink):
        target = os.path.join(base, link.filename)
        if not _inside(target, data_dir):
            raise DataError(
                f"{where} is an HDF5 external link to {link.filename!r}, outside the data "
                f"directory {data_dir!r}; refused"
            )
    node = group[name]
    if isinstance(node, h5py.Dataset):
        if node.is_virtual:
            for source in node.virtual_sources():
                if source.file_name == ".":
                    continue
                if not _inside(os.path.join(base, source.file_name), data_dir):
                    raise DataError(
                        f"{where} is a virtual dataset reading {source.file_name!r}, outside "
                        f"the data directory {data_dir!r}; refused"
                    )
        for entry in node.external or ():
            file_name = _text(entry[0])
            if not _inside(os.path.join(base, file_name), data_dir):
                raise DataError(
                    f"{where} stores its data in the external file {file_name!r}, outside the "
                    f"data directory {data_dir!r}; refused"
                )
    return node


def _key(name: str) -> str:
    """A hickle key group's name as the key: ``"k"``, ``'k'``, ``u'k'``, ``b'k'`` -> k."""
    for prefix in ("u", "b", ""):
        for quote in ("'", '"'):
            opens, closes = name.startswith(prefix + quote), name.endswith(quote)
            if len(name) >= len(prefix) + 2 and opens and closes:
                return name[len(prefix) + 1 : -1]
    return name


class StoryFile:
    """A story file (plain HDF5 or hickle) as movie key -> value, where a value is a
    numeric h5py.Dataset or a dict of them (``rgb``, ``sub``). Opening reads names and
    attributes only; :meth:`value` resolves one movie's nodes (no feature is read)."""

    def __init__(self, path: str, data_dir: str) -> None:
        self.path, self.data_dir = path, data_dir
        try:
            self.file = h5py.File(path, "r")
        except (OSError, RuntimeError, ValueError) as exc:
            raise DataError(f"{path}: cannot be read ({one_line(exc)})") from exc
        try:
            self.format, self._root, self._names = self._index()
        except BaseException:
            self.file.close()
            raise

    # -- layout ------------------------------------------------------------------------
    def _index(self) -> tuple[str, h5py.Group, dict[str, str]]:
        f, attrs = self.file, self.file.attrs
        if "HICKLE_VERSION" in attrs:  # hickle 4 and 5
            version = f"hickle {_text(attrs['HICKLE_VERSION'])}"
            root = self._group(f, "data", f"{self.path}:data")
            self._expect(root, "dict", f"{self.path}:data", version)
        elif _text(attrs.get("CLASS", b"")) == "hickle" or "hickle" in _text(
            attrs.get("type", b"")
        ):  # hickle 2 and 3 (both write VERSION 3 or a 3.x string)
            version = f"hickle {_text(attrs.get('VERSION', '2/3'))}"
            root = self._group(f, "data_0", f"{self.path}:data_0")
            self._expect(root, "dict", f"{self.path}:data_0", version)
        else:
            return "hdf5", f, {name: name for name in f}
        names = {}
        for name in root:
            names.setdefault(_key(name), name)
        return version, root, names

    def _group(self, group: h5py.Group, name: str, where: str) -> h5py.Group:
        node = check_node(group, name, where, self.data_dir)
        if not isinstance(node, h5py.Group):
            raise DataError(f"{where} is a {type(node).__name__}, expected a hickle dict group")
        return node

    def kind(self, node: h5py.HLObject) -> str | None:
        """The hickle kind of ``node`` (``dict``, ``dict_item``, ``ndarray``, ``pickle``,
        ...) from its attributes alone, or None for plain HDF5."""
        attrs = node.attrs
        if "base_type" in attrs:  # hickle 4
            return _text(attrs["base_type"])
        if "type" not in attrs:
            return None
        value = attrs["type"]
        if isinstance(value, h5py.Reference):  # hickle 5: a reference to the types table
            entry = self.file[value]
            base = entry.attrs.get("base_type")
            if isinstance(base, h5py.Reference):
                return os.path.basename(self.file[base].name)
            return _text(base) if base is not None else os.path.basename(entry.name)
        text = _text(value)  # hickle 2: "dict"; hickle 3: "<type 'dict'>", "<class 'dict'>"
        for kind in ("dict_item", "dict", "ndarray", "pickle"):
            if kind == text or f"'{kind}'" in text:
                return kind
        return text

    def _expect(self, node: h5py.HLObject, kind: str, where: str, version: str) -> None:
        found = self.kind(node)
        if found == kind:
            return
        if found is None or "pickle" in found:
            what = (
                f"a pickled Python object ({version} type {found!r})"
                if found is not None
                else f"a node without a hickle type, as {version} stores a pickled Python object"
            )
            raise DataError(f"{where} holds {what}; refused: nothing in a data file is unpickled")
        article = "an" if kind[0] in "aeiou" else "a"
        raise DataError(f"{where} is a {version} {found!r}, expected {article} {kind}")

    # -- access ------------------------------------------------------------------------
    def __contains__(self, movie: str) -> bool:
        return movie in self._names

    def keys(self) -> list[str]:
        return list(self._names)

    def value(self, movie: str):
        """Movie ``movie``'s story: an h5py.Dataset, or a dict of its members (hickle's
        and HDF5's groups alike); raises DataError for anything a reader must not touch."""
        where = f"{self.path}:{movie}"
        if movie not in self._names:
            raise DataError(f"{self.path}: no story for movie {movie!r}")
        return self._resolve(self._root, self._names[movie], where)

    def _resolve(self, group: h5py.Group, name: str, where: str, depth: int = 0):
        if depth > MAX_DEPTH:  # a story is a dict of arrays; a link cycle would not end
            raise DataError(f"{where}: nested deeper than a story can be ({MAX_DEPTH} levels)")
        node = check_node(group, name, where, self.data_dir)
        if self.format == "hdf5":
            if isinstance(node, h5py.Group):
                return {k: self._resolve(node, k, f"{where}/{k}", depth + 1) for k in node}
            return node
        kind = self.kind(node)
        if kind == "dict_item":  # hickle 2/3 (data_0) and 4 (data): the item's value
            inner = next((n for n in ("data_0", "data") if isinstance(node, h5py.Group)
                          and n in node), None)  # fmt: skip
            if inner is None:
                raise DataError(f"{where}: a hickle dict item without its value (data_0)")
            node = check_node(node, inner, f"{where}/{inner}", self.data_dir)
        if isinstance(node, h5py.Group):
            self._expect(node, "dict", where, self.format)
            return {_key(k): self._resolve(node, k, f"{where}/{_key(k)}", depth + 1) for k in node}
        self._expect(node, "ndarray", where, self.format)
        return node

    def close(self) -> None:
        if self.file:
            self.file.close()
