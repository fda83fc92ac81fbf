"""MkDocs hook: the plots of ``benchmarks/results/`` in the site, without copying them into ``docs/``.

The pages link to the plots by their path in the repository (``../benchmarks/results/accuracy_size.png`` from a
page in ``docs/``), which a reader of the repository can follow. This hook registers each plot under that same
source path, so MkDocs resolves and validates the links (``mkdocs build --strict`` fails on a missing plot), and
copies it to ``assets/results/`` in the site.
"""

from __future__ import annotations

import glob
import os

from mkdocs.structure.files import File, InclusionLevel

RESULTS = os.path.join("benchmarks", "results")
SITE_FOLDER = "assets/results"


def on_files(files, config):
    docs_dir = config["docs_dir"]
    root = os.path.dirname(os.path.abspath(docs_dir))
    for path in sorted(glob.glob(os.path.join(root, RESULTS, "*.png"))):
        name = os.path.basename(path)
        src_uri = os.path.relpath(path, docs_dir).replace(os.sep, "/")  # ../benchmarks/results/<name>
        files.append(
            File(
                src_uri,
                docs_dir,
                config["site_dir"],
                config["use_directory_urls"],
                dest_uri=f"{SITE_FOLDER}/{name}",
                inclusion=InclusionLevel.INCLUDED,
            )
        )
    return files
