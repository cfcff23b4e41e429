"""bcd's built-in plugins, registered through the ``bcd`` entry-point group like any third party's."""
