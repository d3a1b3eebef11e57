<?php

// The module's classes (no Composer in a Perfex module folder).
spl_autoload_register(static function (string $class): void {
    $prefix = 'PerfexWebhooks\\';
    if (strncmp($class, $prefix, strlen($prefix)) === 0) {
        $file = __DIR__ . '/' . substr($class, strlen($prefix)) . '.php';
        if (is_file($file)) {
            require_once $file;
        }
    }
});
