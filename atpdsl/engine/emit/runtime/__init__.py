"""The emitted program's own code: copied into it without imports (see atpdsl.engine.emit.program)."""
