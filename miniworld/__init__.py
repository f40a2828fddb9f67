"""The shipped example: the miniature text-to-image model (model.py), the world it draws (world.py),
the classifier the demo reads its pictures with (classifier.py), their weights, and the loader node
(comfy_nodes.py), the one part the pack imports. The lab that trains and measures it is `lab/`."""
