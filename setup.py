from setuptools import find_packages, setup

setup(
    name="hist",
    version="0.1.0",
    description="Independent subnetwork training (ResIST) of pre-activation ResNets with Horovod and MPI",
    packages=find_packages(include=["hist", "hist.*"]),
    python_requires=">=3.9",
    # torch is pinned by the installer (tools/bootstrap.sh) or by the cluster's module/conda env;
    # horovod is built from source with the C++17 fix, so it is not listed as a pip dependency here.
    install_requires=["torch>=2.0", "numpy", "h5py", "click", "matplotlib", "mpi4py", "scipy"],
    extras_require={"test": ["pytest"], "horovod": ["horovod[pytorch]==0.28.1"]},
    entry_points={
        "console_scripts": [
            "hist-train=hist.cli:train",
            "hist-report=hist.cli:report",
            "hist-bench=hist.cli:bench",
        ]
    },
)
