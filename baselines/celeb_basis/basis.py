"""The celebrity basis: where CelebBasis's two identity word vectors live.

From a list of celebrity names (the official ``infer_images/wiki_names_v2.txt``: 691 lines, 646 distinct
names), each distinct name is tokenized and looked up in the text encoder's word-embedding table (no
transformer, no position embedding). Column j (j = 0, 1) gathers the embedding of every name's j-th BPE
token; a name with fewer tokens is left out of that column (646 and 638 rows for the official list). Per
column: the mean ``c_j`` and the first ``k`` right-singular vectors ``V_j`` (k x width, orthonormal rows)
of the centred rows. An identity with coefficients ``a`` (2, k) is the pair of word vectors
``e_j = c_j + a_j @ V_j``.

``k`` is at most the number of rows minus one (the centred rows span no more) and at most the text width
(no more orthonormal directions exist): :func:`effective_basis_size`. For SD 1.4 (width 768) with the
official list, ``k = 512``, so a face is 2 x 512 = 1024 numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

#: Word vectors per identity (CelebBasis's ``num_embeds_per_token``).
N_TOKENS = 2
#: Basis directions per token in the official configuration (``n_components``, ``meta_inner_dim``).
OFFICIAL_BASIS_SIZE = 512
#: Rows per column of the official names list (646 distinct names; 638 have a second token).
OFFICIAL_ROWS = (646, 638)
NAMES_FILE = "infer_images/wiki_names_v2.txt"
NAMES_PUBLISHED = (
    f"The official list is {NAMES_FILE} in the CelebBasis repository, https://github.com/ygtxr1997/CelebBasis "
    "(MIT). Set methods[i].params.names to the local path of that file (one name per line), or names: random "
    "for an offline check of the machinery (a random basis of the same shape; images are not meaningful)."
)


def read_names(path: Path) -> list[str]:
    """The distinct lines of a names file, sorted (the official order: a set, then ``sort``)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return sorted(set(lines))


def name_token_ids(tokenizer, names: Sequence[str], n_tokens: int = N_TOKENS) -> list[list[int]]:
    """Per column j < n_tokens, the id of the j-th BPE token of every name that has one, in name order."""
    columns: list[list[int]] = [[] for _ in range(n_tokens)]
    for name in names:
        ids = tokenizer(name, add_special_tokens=False, truncation=True,
                        max_length=tokenizer.model_max_length - 2).input_ids
        for j, token in enumerate(ids[:n_tokens]):
            columns[j].append(int(token))
    return columns


def token_rows(table: torch.Tensor, columns: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The word-embedding rows (n_j, width) of each column's token ids, float64 on the CPU."""
    weight = table.detach().to("cpu", torch.float64)
    return [weight[torch.tensor(list(ids), dtype=torch.long)] for ids in columns]


def random_token_columns(vocab_size: int, generator: torch.Generator,
                         rows: Sequence[int] = OFFICIAL_ROWS) -> list[list[int]]:
    """Offline stand-in for the names: per column, ``rows[j]`` distinct token ids drawn at random."""
    if max(rows) > vocab_size:
        raise ValueError(f"cannot draw {max(rows)} distinct tokens from a vocabulary of {vocab_size}")
    return [torch.randperm(vocab_size, generator=generator)[:n].tolist() for n in rows]


def effective_basis_size(requested: int, rows: Sequence[int], width: int) -> int:
    """Directions per token: ``min(requested, min(rows) - 1, width)`` (512 for SD 1.4 and the official names)."""
    return int(min(requested, min(rows) - 1, width))


def pca_basis(columns: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """(len(columns), 1 + size, width) float32: per column its mean row, then ``size`` orthonormal directions.

    columns: (n_j, width) rows per column. The directions are the right-singular vectors of the centred
    rows, by decreasing singular value. Each is signed so that its largest-magnitude entry is positive
    (an SVD's signs are arbitrary; this makes the basis the same on every machine).
    """
    out = []
    for rows in columns:
        rows = rows.to(torch.float64)
        if size > min(rows.shape[0] - 1, rows.shape[1]):
            raise ValueError(f"a basis of {size} directions needs more than {size} rows of width >= {size}, "
                             f"got {tuple(rows.shape)}")
        mean = rows.mean(dim=0, keepdim=True)
        _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)
        directions = vh[:size]
        peak = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
        out.append(torch.cat([mean, directions * torch.sign(peak)]))
    return torch.stack(out).float()


def word_vectors(basis: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``e_j = c_j + a_j @ V_j``: coefficients (B, n, k) on basis (n, 1 + k, width) -> (B, n, width)."""
    basis = basis.to(coefficients)
    return basis[:, 0] + torch.einsum("bnk,nkc->bnc", coefficients, basis[:, 1:])
