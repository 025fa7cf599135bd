"""HTTP routes; each module is a thin layer over decode -> inference -> encode."""
