"""Recipes that build the workbench's bundled assets; not part of the installed package."""
