"""ListOps: the release's TSV files (or generated ones), tokenised into a cache, as a datamodule.

Layout under `data_dir`:

    lra_release.gz, or lra_release/[lra_release/]listops-1000/basic_{train,val,test}.tsv
                                                  the release's files, read first
    generated/listops/<key>/basic_{train,val,test}.tsv, .generated.json
                                                  generated sets, used only without the release;
                                                  <key> hashes the generator settings recorded in
                                                  .generated.json
    cache/listops/<key>/                          token arrays, keyed by what made them

A folder holding `.generated.json` is a generated set wherever it is (also at `source=`), and
never read as the release. Versions before this layout generated into
`lra_release/listops-1000/`, where the release is looked for: such a set (recognised by its
`.generated.json`) is moved to `generated/listops/<key>/` on the next run, so that a release put
into data_dir later is read.

Tokens: pad 0, digits 0-9 -> 1..10, `[MIN [MAX [MED [SM` -> 11..14, `]` -> 15; parentheses are
dropped, so a sequence has as many tokens as its tree's length.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mra_lra.data.base import DATA_DIR_FIX, LRADataModule, pad_sequences
from mra_lra.data.cache import (
    cache_key,
    file_fingerprint,
    remove_stale_temp_dirs,
)
from mra_lra.data.listops_generator import (
    OPERATORS,
    SIDECAR_NAME,
    SPLITS,
    TSV_HEADER,
    generator_settings,
    split_path,
    write_listops_files,
)
from mra_lra.data.sources import SourceError, SourceTree, locate_source
from mra_lra.utils import ensure_writable_dir

log = logging.getLogger(__name__)

PAD_ID = 0
VOCAB: dict[str, int] = {
    **{str(d): d + 1 for d in range(10)},
    **{op: 11 + i for i, op in enumerate(OPERATORS)},
    "]": 15,
}
# Bump when VOCAB or the tokenisation changes, so that cached arrays are rebuilt.
VOCAB_VERSION = 1
_LABELS = {str(d): d for d in range(10)}
_DROP_PARENTHESES = str.maketrans("", "", "()")

ANCHOR = "listops-1000"
# Where the release may sit under data_dir: a folder with listops-1000/ at most three levels
# down (lra_release/listops-1000 or lra_release/lra_release/listops-1000), or the archive.
RELEASE_CANDIDATES = ("lra_release", "lra_release.gz", "lra_release.tar.gz")
HOW_TO_GET = (
    "Get lra_release.gz from https://storage.googleapis.com/long-range-arena/lra_release.gz and "
    "put it at <data_dir>/lra_release.gz (or extract it there), or pass data.source=<its path> "
    "(to prepare: source=<its path>); "
    "without it, ListOps is generated."
)
NOT_LRA = "Accuracies on it are not LRA ListOps numbers."


def listops_dir(data_dir: str | os.PathLike) -> Path:
    """Where an extracted release may keep the ListOps files: `<data_dir>/lra_release/listops-1000`
    (generated sets lived here before they got their own folder)."""
    return Path(data_dir) / "lra_release" / "listops-1000"


def generated_root(data_dir: str | os.PathLike) -> Path:
    """The folder of generated ListOps sets: `<data_dir>/generated/listops`."""
    return Path(data_dir) / "generated" / "listops"


def generated_dir(data_dir: str | os.PathLike, settings: dict[str, Any]) -> Path:
    """Where the set generated with `settings` (`generator_settings(...)`) lives."""
    return generated_root(data_dir) / cache_key(settings)


def read_sidecar(directory: Path) -> dict[str, Any] | None:
    """The generator settings recorded in `directory` (None when it holds no sidecar: not a
    generated set)."""
    sidecar = directory / SIDECAR_NAME
    if not sidecar.is_file():
        return None
    try:
        settings = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SourceError(
            f"{sidecar} marks {directory} as a generated ListOps set but cannot be read ({err}); "
            f"delete {directory} and run again"
        ) from err
    if not isinstance(settings, dict):
        raise SourceError(f"{sidecar} is not a settings record; delete {directory} and run again")
    return settings


def _is_complete(directory: Path) -> bool:
    return all(split_path(directory, s).is_file() for s in SPLITS)


def move_legacy_generated(data_dir: str | os.PathLike) -> Path | None:
    """Move a set that an older version generated into `<data_dir>/lra_release/listops-1000`
    (recognised by its sidecar), where the release is looked for, to `generated/listops/<key>/`;
    returns where it went, or None when there was none. A set that is incomplete, that already
    has a copy there, or that cannot be renamed there (another filesystem) is removed instead: it
    is generated again when needed."""
    legacy = listops_dir(data_dir)
    settings = read_sidecar(legacy)
    if settings is None:
        return None
    target = generated_dir(data_dir, settings)
    what = f"ListOps: {legacy} holds a set generated by an older version of this code"
    try:
        ensure_writable_dir(target.parent, DATA_DIR_FIX)
        if _is_complete(legacy) and not target.exists():
            try:
                os.rename(legacy, target)
            except OSError:
                pass  # another filesystem: removed below; gone: another process moved it
            else:
                _remove_if_empty(legacy.parent)
                log.warning(
                    "%s; moved it to %s, where generated sets now live, so that a release put "
                    "into %s is read first",
                    what,
                    target,
                    data_dir,
                )
                return target
        try:
            shutil.rmtree(legacy)
        except FileNotFoundError:
            pass  # another process moved or removed it
    except OSError as err:
        raise PermissionError(
            f"{what}, where the release is looked for, and it can be neither moved to {target} "
            f"nor removed ({err}). Move or delete {legacy} yourself."
        ) from err
    _remove_if_empty(legacy.parent)
    log.warning("%s; removed it (it is generated again when needed)", what)
    return None


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` (the lra_release/ that an older version made for its set) if empty."""
    try:
        folder.rmdir()
    except OSError:
        pass


def ensure_listops_files(
    data_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    num_test: int,
    min_length: int,
    max_length: int,
    seed: int,
) -> Path:
    """Return the folder of the ListOps set generated with these settings,
    `<data_dir>/generated/listops/<key>/`, generating it first (atomically) when it is not there.
    `min_length` and `max_length` are the generator's exclusive length bounds."""
    settings = generator_settings(num_train, num_val, num_test, min_length, max_length, seed)
    directory = generated_dir(data_dir, settings)
    if not directory.exists():
        ensure_writable_dir(directory.parent, DATA_DIR_FIX)
        remove_stale_temp_dirs(directory.parent, r"[0-9a-f]{16}")  # other settings' too
        log.info("ListOps: generating %s into %s", settings, directory)
        try:
            write_listops_files(
                directory,
                num_train,
                num_val,
                num_test,
                min_length=min_length,
                max_length=max_length,
                seed=seed,
            )
        except FileExistsError:
            if not directory.exists():
                raise  # otherwise another process generated it meanwhile: check it below
    _check_generated(directory, settings)
    return directory


def _check_generated(directory: Path, settings: dict[str, Any]) -> None:
    recorded = read_sidecar(directory)
    if recorded is None or not _is_complete(directory):
        raise SourceError(
            f"{directory} is not a complete generated ListOps set (generated sets are written "
            f"whole, so its files were changed afterwards); delete {directory} and run again"
        )
    if recorded != settings:
        raise SourceError(
            f"{directory / SIDECAR_NAME} records {recorded}, not the settings its folder is named "
            f"after ({settings}); delete {directory} and run again"
        )


def parse_listops_tsv(text: str, name: str) -> tuple[list[np.ndarray], list[int]]:
    """Token ids (uint8, without padding) and labels of each row of a release-format TSV; `name`
    is the file shown in errors. A malformed row raises ValueError naming the file and line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    header = lines[0].rstrip("\r") if lines else ""
    if header != TSV_HEADER:
        raise ValueError(f"{name}:1: expected the header {TSV_HEADER!r}, found {header!r}")
    token_ids, labels = [], []
    for line_no, line in enumerate(lines[1:], start=2):
        columns = line.rstrip("\r").split("\t")
        if len(columns) != 2:
            raise ValueError(
                f"{name}:{line_no}: expected 2 tab-separated columns (Source, Target), "
                f"found {len(columns)}"
            )
        source, target = columns
        if target not in _LABELS:
            raise ValueError(f"{name}:{line_no}: the label {target!r} is not an integer 0-9")
        words = source.translate(_DROP_PARENTHESES).split()
        try:
            ids = np.fromiter(map(VOCAB.__getitem__, words), dtype=np.uint8, count=len(words))
        except KeyError as err:
            raise ValueError(
                f"{name}:{line_no}: unknown token {err.args[0]!r}; "
                f"valid tokens are {' '.join(VOCAB)} and parentheses"
            ) from None
        token_ids.append(ids)
        labels.append(_LABELS[target])
    return token_ids, labels


def read_listops_tsv(path: str | os.PathLike) -> tuple[list[np.ndarray], list[int]]:
    """`parse_listops_tsv` of a file."""
    return parse_listops_tsv(Path(path).read_text(encoding="utf-8"), str(path))


def tokenise_split(text: str, name: str, max_length: int, split: str) -> dict[str, np.ndarray]:
    """Arrays of one split: `input_ids` uint8 [N, max_length] padded with PAD_ID and truncated
    to max_length (one warning counts the truncated rows), `label` uint8 [N] and `length` int32
    [N], the length before truncation."""
    token_ids, labels = parse_listops_tsv(text, name)
    input_ids, lengths = pad_sequences(token_ids, max_length, np.uint8, split)
    return {"input_ids": input_ids, "label": np.array(labels, dtype=np.uint8), "length": lengths}


def _cache_options(
    tree: SourceTree, max_length: int, generated: dict[str, Any] | None
) -> dict[str, Any]:
    if tree.is_archive:
        files = {"archive": file_fingerprint(tree.path)}
    else:
        files = {split: file_fingerprint(split_path(tree.root, split)) for split in SPLITS}
    options = {
        "task": "listops",
        "vocab_version": VOCAB_VERSION,
        "max_length": max_length,
        "files": files,
    }
    if generated is not None:
        # Generated arrays never share an entry with the release's, even if the files' sizes
        # and times happened to match.
        options["generated"] = generated
    return options


def _build_arrays(tree: SourceTree, max_length: int) -> dict[str, np.ndarray]:
    names = {split_path(Path(), split).name: split for split in SPLITS}
    texts = tree.read_text_files(list(names))
    arrays = {}
    for file_name, split in names.items():
        where = tree.where(file_name)
        for key, array in tokenise_split(texts[file_name], where, max_length, split).items():
            arrays[f"{split}_{key}"] = array
    return arrays


class ListOpsDataModule(LRADataModule):
    """ListOps from the release's files, else generated into `<data_dir>/generated/listops/`.

    Files are read from `source` when given, else from the release under data_dir
    (`lra_release/listops-1000/`, a nested `lra_release/lra_release/listops-1000/`, or the
    `lra_release.gz` archive), looked for anew on every run. Only when there is none is the set
    generated with the `gen_*` / `num_*` settings used (generated first when missing). After
    `prepare_data` or `setup`, `generated` holds the generator settings of the set in use, or
    None for the release; the log says which, and the cache key depends on it."""

    task = "listops"
    num_classes = 10
    vocab_size = len(VOCAB) + 1

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        max_length: int,
        num_workers: int,
        num_train: int,
        num_val: int,
        num_test: int,
        gen_min_length: int,
        gen_max_length: int,
        seed: int,
        pin_memory: bool = False,
        source: str | None = None,
    ) -> None:
        super().__init__(data_dir, batch_size, max_length, num_workers, pin_memory, source)
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.gen_min_length = gen_min_length
        self.gen_max_length = gen_max_length
        self.seed = seed
        self._tree: SourceTree | None = None
        self.generated: dict[str, Any] | None = None

    def _generator_args(self) -> dict[str, int]:
        """The generator's keyword arguments (of ensure_listops_files and generator_settings)."""
        return {
            "num_train": self.num_train,
            "num_val": self.num_val,
            "num_test": self.num_test,
            "min_length": self.gen_min_length,
            "max_length": self.gen_max_length,
            "seed": self.seed,
        }

    def _check_generator_options(self) -> None:
        """Refuse settings the generator cannot honour, naming the options, before generating."""
        self._check_generated_sizes(
            {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        )
        if not 0 <= self.gen_min_length < self.gen_max_length - 1:
            raise ValueError(
                "data.gen_min_length and data.gen_max_length are exclusive bounds on the generated "
                "trees' lengths: need 0 <= data.gen_min_length < data.gen_max_length - 1, got "
                f"data.gen_min_length={self.gen_min_length}, "
                f"data.gen_max_length={self.gen_max_length}"
            )

    def _find_tree(self, generate: bool) -> tuple[SourceTree, dict[str, Any] | None]:
        """The files to read, and the generator settings when they are a generated set."""
        if self.source is not None:
            tree = locate_source(self.data_dir, self.source, ANCHOR, (), HOW_TO_GET)
        else:
            move_legacy_generated(self.data_dir)
            try:
                tree = locate_source(self.data_dir, None, ANCHOR, RELEASE_CANDIDATES, HOW_TO_GET)
            except FileNotFoundError as err:
                self._check_generator_options()
                settings = generator_settings(**self._generator_args())
                directory = generated_dir(self.data_dir, settings)
                if generate:
                    ensure_listops_files(self.data_dir, **self._generator_args())
                elif not directory.exists():
                    raise FileNotFoundError(
                        f"{err} No generated set for these settings in {directory} either; "
                        "call prepare_data() first (the Trainer does)."
                    ) from None
                else:
                    _check_generated(directory, settings)
                return SourceTree(directory, directory.name), settings
        if tree.is_archive:
            return tree, None
        missing = [p.name for p in (split_path(tree.root, s) for s in SPLITS) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{tree.root} lacks {', '.join(missing)}: put all three release files there, or "
                f"delete the folder to have ListOps generated (an interrupted generation by an "
                f"older version of this code can leave such a folder). {HOW_TO_GET}"
            )
        return tree, read_sidecar(tree.root)

    def ensure_sources(self) -> None:
        self._tree, self.generated = self._find_tree(generate=True)
        tree, generated = self._tree, self.generated
        if generated is None:
            log.info("ListOps: reading the release's files from %s", tree.path)
        elif tree.root.parent != generated_root(self.data_dir):
            log.warning(
                "ListOps: %s holds a generated set (%s), not the release. %s",
                tree.root,
                generated,
                NOT_LRA,
            )
        else:
            log.warning(
                "ListOps: no release under %s (looked for %s), so the set generated with %s in "
                "%s is used. %s %s",
                self.data_dir,
                ", ".join(RELEASE_CANDIDATES),
                generated,
                tree.root,
                NOT_LRA,
                HOW_TO_GET.replace("; without it, ListOps is generated", " to use it instead"),
            )

    def cache_options(self) -> dict[str, Any]:
        if self._tree is None:
            self._tree, self.generated = self._find_tree(generate=False)
        return _cache_options(self._tree, self.max_length, self.generated)

    def build_arrays(self) -> dict[str, np.ndarray]:
        return _build_arrays(self._tree, self.max_length)
