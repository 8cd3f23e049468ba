"""Chemistry: elements, bond perception, stability, RDKit conversion, SDF/XYZ I/O."""
