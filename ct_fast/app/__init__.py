"""The application on top of the engine: the ``ct-fast`` command line, run directories, the demo, tasks, data,
pictures and the step benchmark."""
