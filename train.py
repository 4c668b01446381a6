"""Train the latent: ``python train.py fit --config configs/tiny.yaml`` (also validate, test),
the same as ``vtrans fit --config configs/tiny.yaml`` from an installed package."""

from vtrans.cli import train_main

if __name__ == "__main__":
    train_main()
