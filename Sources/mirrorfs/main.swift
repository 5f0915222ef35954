// Entry point: errors print as one line (SPEC section 6), never with the usage text.
Mirrorfs.runReportingOneLineErrors()
