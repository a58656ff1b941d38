"""Entry points of the ``sparse-detector`` CLI (bench, sim, demo, ...). ROS-free except demo."""
