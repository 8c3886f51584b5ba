"""Window grid and stitching: where model windows sit on a scene, and how their predictions blend."""
