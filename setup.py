from setuptools import find_packages, setup

setup(
    name="hist",
    version="0.1.0",
    description="Independent subnetwork training (ResIST) of pre-activation ResNets with Horovod and MPI",
    packages=find_packages(include=["hist", "hist.*"]),
    python_requires=">=3.9",
    # torch is pinned by the installer (tools/bootstrap.sh) or by the cluster's module/conda env;
    # >= 2.3 for torch.amp.GradScaler(device) as --precision fp16 uses it. Horovod is built from
    # source with the C++17 fix, so it is not a pip dependency; mpi4py neither: one process
    # trains without MPI (pip install hist[distributed] for more than one).
    install_requires=["torch>=2.3", "numpy", "h5py", "click", "matplotlib", "scipy"],
    extras_require={
        "test": ["pytest"],
        "tensorboard": ["tensorboard"],
        "distributed": ["mpi4py", "horovod[pytorch]==0.28.1"],
    },
    entry_points={
        "console_scripts": [
            "hist-train=hist.cli:train",
            "hist-report=hist.cli:report",
            "hist-bench=hist.cli:bench",
        ]
    },
)
