"""Runtime plumbing shared by every side: the command line, Flower's processes and
logs, run directories, tensors on the wire and the generated reference. No learning maths."""
