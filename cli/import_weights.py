"""``memkern import``."""
from __future__ import annotations

import click

from memkern.cli.options import DATASET_HELP, MODEL_HELP, DatasetSpec, data_dir_option, model_name


@click.command(name="import")
@click.option("--weights", required=True, type=click.Path(dir_okay=False),
              help="A .safetensors file, or a torch file of model.state_dict() (read with "
                   "weights_only=True: no code is unpickled).")
@click.option("--model", required=True, callback=model_name,
              help="The architecture the weights belong to: " + MODEL_HELP)
@click.option("--norm", type=click.Choice(["batch", "group"]), default="batch", show_default=True)
@click.option("--dataset", required=True, type=DatasetSpec(), help=DATASET_HELP)
@click.option("--train-labels", type=click.Path(dir_okay=False),
              help="The labels the model was trained with (.npy, or .csv rows index,label): "
                   "examples whose label differs from the dataset's are the noisy set.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@data_dir_option
def import_weights(weights, model, norm, dataset, train_labels, out, data_dir):
    """Turn weights trained outside memkern into a run directory for evaluate, grads,
    localize and scores (rewind and retrain need memkern's own training history).

    \b
    Example:
      memkern import --weights my_cnn.pt --model cnn --dataset npz:data.npz \\
          --train-labels labels.npy --out runs/mine
      memkern localize --ckpt runs/mine/checkpoints/epoch_001.safetensors
    """
    from memkern.training.import_weights import import_weights as run_import

    run = run_import(weights=weights, model=model, dataset=dataset, out=out,
                     train_labels=train_labels, norm=norm, data_dir=data_dir)
    noise = run.load_noise()
    split = (f"{len(noise['noisy_indices'])} of {noise['num_train']} training labels differ "
             f"from the dataset's" if train_labels else
             "no --train-labels: analyses of the noisy/clean split are not available")
    click.echo(f"run saved to {run.root} (checkpoint {run.final_checkpoint().name}; {split})")
