<?php

defined('BASEPATH') or exit('No direct script access allowed');

// Run on activation (and again on upgrade: every statement is idempotent).
$CI = &get_instance();

$spool = db_prefix() . 'perfex_webhooks_spool';
$state = db_prefix() . 'perfex_webhooks_state';

// Events the pipeline has not taken yet, oldest first (id order = send order).
$CI->db->query('CREATE TABLE IF NOT EXISTS `' . $spool . '` (
    `id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    `event_id` VARCHAR(64) NOT NULL,
    `event` VARCHAR(100) NOT NULL,
    `resource_id` VARCHAR(100) NOT NULL,
    `body` MEDIUMTEXT NOT NULL,
    `created_at` DATETIME NOT NULL,
    `attempts` INT NOT NULL DEFAULT 0,
    `last_error` VARCHAR(255) NULL
) ENGINE=InnoDB DEFAULT CHARSET=' . $CI->db->char_set . ';');

// Small named values: the flush lock, the pause after a failed send, the last error.
$CI->db->query('CREATE TABLE IF NOT EXISTS `' . $state . '` (
    `name` VARCHAR(64) NOT NULL PRIMARY KEY,
    `until_ts` BIGINT NOT NULL DEFAULT 0,
    `note` VARCHAR(255) NULL
) ENGINE=InnoDB DEFAULT CHARSET=' . $CI->db->char_set . ';');

foreach (['flush_lock', 'paused', 'last_error'] as $name) {
    if ($CI->db->where('name', $name)->count_all_results($state) == 0) {
        $CI->db->insert($state, ['name' => $name, 'until_ts' => 0, 'note' => '']);
    }
}

foreach (\PerfexWebhooks\Module::OPTIONS as $name => $default) {
    add_option($name, $default, 0); // keeps an existing value
}
