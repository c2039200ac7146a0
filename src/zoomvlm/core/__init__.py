"""The shared core of both methods: geometry (boxes, budgets, crops), prompts, the pipeline (views from a
policy's proposal -> target request -> record), metrics and crop drawings. No model code lives here."""
